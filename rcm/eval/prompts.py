"""Prompt sets to sample from: the toy's classes, a directory of text-embedding files, or a list file.

There is no text encoder yet, so every prompt must come with its embedding (L, text_dim):
  ``toy``          the mixture's prompts and embeddings (one per class);
  a directory      every ``NAME.pt`` in it (sorted by name) holds an embedding; the prompt text is the
                   content of ``NAME.txt`` beside it, or NAME;
  a ``.pt`` file   one prompt: that embedding (text as for a directory's file);
  a text file      one prompt per line (blank lines and ``#`` comments skipped): either the path of an
                   embedding ``.pt`` (relative to the list file), optionally followed by a tab and the
                   prompt text, or the text of a toy prompt ("toy prompt 3").
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rcm.data.toy import ToyMixture
from rcm.eval.networks import NetworkSource
from rcm.torch_files import read_torch_file

TOY_PROMPTS = "toy"


@dataclass(frozen=True)
class Prompt:
    """One prompt: its position in the set, its text, its embedding (L, text_dim) and its toy class if any."""

    index: int
    text: str
    embedding: torch.Tensor
    class_id: int | None = None

    def embedding_digest(self) -> str:
        """sha256 of the embedding values: identifies the prompt in resumable outputs."""
        values = self.embedding.detach().to("cpu", torch.float32).contiguous()
        return hashlib.sha256(values.numpy().tobytes()).hexdigest()


def load_prompts(source: str, mixture: ToyMixture | None = None) -> list[Prompt]:
    """The prompt set named by `source` ('toy', a directory of embeddings or a list file); see the module doc."""
    if source == TOY_PROMPTS:
        if mixture is None:
            raise ValueError("--prompts toy needs the toy ground truth: pass --ground-truth PATH/ground_truth.pt")
        return toy_prompts(mixture)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.pt"))
        if not files:
            raise FileNotFoundError(f"prompt directory {path} holds no .pt embedding files")
        return [_embedding_prompt(index, file, None) for index, file in enumerate(files)]
    if path.is_file() and path.suffix == ".pt":
        return [_embedding_prompt(0, path, None)]
    if path.is_file():
        return _prompts_from_list(path, mixture)
    raise FileNotFoundError(f"--prompts {source}: no such file or directory (give 'toy', a directory of .pt embeddings or a list file)")


@dataclass
class PromptInputs:
    """What sampling a prompt set needs besides the network: the prompts, the toy ground truth (if any), the
    latent shape and the CFG negative embedding (if any)."""

    prompts: list[Prompt]
    mixture: ToyMixture | None
    latent_shape: tuple[int, int, int, int]
    negative_embedding: torch.Tensor | None


def resolve_prompt_inputs(
    prompts_source: str,
    source: NetworkSource,
    ground_truth: str | None = None,
    negative_embedding: str | None = None,
    latent_shape: list[int] | None = None,
) -> PromptInputs:
    """Prompts and their companions from the options, falling back on the run's data config.

    Ground truth: `ground_truth`, else the run's data.ground_truth. Latent shape: the mixture's for toy
    prompts, else `latent_shape`, else the run's data.latent_shape. Negative embedding: the file
    `negative_embedding`, else the mixture's, else the run's data.negative_embedding if that file exists.
    """
    from rcm.train import load_negative_embedding

    ground_truth = ground_truth or source.run_setting("data.ground_truth")
    mixture = None
    if ground_truth and Path(ground_truth).is_file():
        mixture = ToyMixture.load(ground_truth)
    elif prompts_source == TOY_PROMPTS or ground_truth:
        raise FileNotFoundError(f"no toy ground truth found (got {ground_truth!r}); pass --ground-truth PATH")
    prompts = load_prompts(prompts_source, mixture)
    check_embeddings(prompts, source.model_cfg.text_len, source.model_cfg.text_dim)

    if any(prompt.class_id is not None for prompt in prompts):
        latent_shape = mixture.config.latent_shape
    else:
        latent_shape = latent_shape or source.run_setting("data.latent_shape")
        if latent_shape is None:
            raise ValueError("the latent shape is unknown for these prompts: pass --latent-shape C T H W")

    cpu = torch.device("cpu")
    run_negative = source.run_setting("data.negative_embedding")
    if negative_embedding:
        negative = load_negative_embedding(negative_embedding, cpu)
    elif mixture is not None:
        negative = mixture.negative_embedding
    elif run_negative and Path(run_negative).is_file():
        negative = load_negative_embedding(run_negative, cpu)
    else:
        negative = None
    return PromptInputs(prompts, mixture, tuple(int(size) for size in latent_shape), negative)


def toy_prompts(mixture: ToyMixture) -> list[Prompt]:
    """One prompt per toy class, in class order."""
    return [
        Prompt(index=class_id, text=text, embedding=mixture.embeddings[class_id], class_id=class_id)
        for class_id, text in enumerate(mixture.prompts)
    ]


def check_embeddings(prompts: list[Prompt], text_len: int, text_dim: int) -> None:
    """Raise ValueError naming the first prompt whose embedding the model cannot take (L ≤ text_len, text_dim)."""
    if not prompts:
        raise ValueError("the prompt set is empty")
    for prompt in prompts:
        shape = tuple(prompt.embedding.shape)
        if len(shape) != 2 or shape[1] != text_dim or not 1 <= shape[0] <= text_len:
            raise ValueError(
                f"prompt {prompt.index} ({prompt.text!r}) has an embedding of shape {shape}; the model takes "
                f"(L, {text_dim}) with 1 ≤ L ≤ {text_len}"
            )


def _embedding_prompt(index: int, file: Path, text: str | None) -> Prompt:
    """A prompt read from an embedding file; text from the argument, a sibling NAME.txt, or the file name."""
    embedding = read_torch_file(file, "prompt embedding", torch.Tensor, "an (L, text_dim) tensor", mmap=False)
    if embedding.ndim == 3 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.ndim != 2:
        raise ValueError(f"prompt embedding {file} has shape {tuple(embedding.shape)}; expected (L, text_dim)")
    if text is None:
        text_file = file.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else file.stem
    return Prompt(index=index, text=text, embedding=embedding.float())


def _prompts_from_list(list_file: Path, mixture: ToyMixture | None) -> list[Prompt]:
    """Prompts of a list file: embedding paths (optionally with a tab and the text) or toy prompt texts."""
    toy_classes = {text: class_id for class_id, text in enumerate(mixture.prompts)} if mixture is not None else {}
    prompts: list[Prompt] = []
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {list_file} is not a text list of prompts (it is not UTF-8 text); give 'toy', "
                         "a directory of .pt embeddings, one embedding .pt or a list file") from None
    for line_number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        head, _, text = entry.partition("\t")
        candidate = list_file.parent / head.strip()
        if head.strip().endswith(".pt"):
            if not candidate.is_file():
                raise FileNotFoundError(f"line {line_number} of {list_file}: embedding file {candidate} does not exist")
            prompts.append(_embedding_prompt(len(prompts), candidate, text.strip() or None))
        elif entry in toy_classes:
            class_id = toy_classes[entry]
            prompts.append(Prompt(len(prompts), entry, mixture.embeddings[class_id], class_id))
        else:
            raise ValueError(
                f"line {line_number} of {list_file}: {entry!r} has no embedding. There is no text encoder yet: "
                "give the path of its embedding .pt" + (" or a toy prompt text" if mixture is not None else "")
            )
    if not prompts:
        raise ValueError(f"prompt list {list_file} holds no prompts")
    return prompts
