"""Prompt sets: the toy's classes, a directory of embeddings, a list file; errors name the file and line."""
import pytest
import torch

from rcm.data.toy import ToyMixture
from rcm.eval.prompts import check_embeddings, load_prompts


@pytest.fixture(scope="module")
def mixture():
    return ToyMixture()


def test_toy_prompts_are_the_classes(mixture):
    """'toy' gives one prompt per class, with its embedding and class id."""
    prompts = load_prompts("toy", mixture)
    assert [p.class_id for p in prompts] == list(range(8)) and prompts[2].text == "toy prompt 2"
    assert torch.equal(prompts[2].embedding, mixture.embeddings[2])


def test_directory_of_embeddings(tmp_path):
    """NAME.pt files in name order; text from NAME.txt, else NAME; a (1, L, D) tensor is squeezed."""
    torch.save(torch.ones(1, 3, 4), tmp_path / "b.pt")
    torch.save(torch.zeros(2, 4), tmp_path / "a.pt")
    (tmp_path / "a.txt").write_text("a red fox\n")
    prompts = load_prompts(str(tmp_path))
    assert [(p.index, p.text, tuple(p.embedding.shape)) for p in prompts] == [(0, "a red fox", (2, 4)), (1, "b", (3, 4))]
    assert prompts[0].class_id is None


def test_list_file_mixes_paths_and_toy_prompts(tmp_path, mixture):
    """A list file: embedding paths (optionally with tab and text), toy prompt texts, comments skipped."""
    (tmp_path / "emb").mkdir()
    torch.save(torch.zeros(2, 32), tmp_path / "emb" / "x.pt")
    (tmp_path / "list.txt").write_text("# eval prompts\nemb/x.pt\ta calm lake\n\ntoy prompt 5\n")
    prompts = load_prompts(str(tmp_path / "list.txt"), mixture)
    assert [(p.text, p.class_id) for p in prompts] == [("a calm lake", None), ("toy prompt 5", 5)]


def test_text_without_embedding_names_the_line(tmp_path, mixture):
    """A prompt text that is neither a path nor a toy prompt fails with the file, line and the way out."""
    (tmp_path / "list.txt").write_text("toy prompt 1\na cat on a sofa\n")
    with pytest.raises(ValueError, match=r"line 2 of .*list.txt.*no embedding.*no text encoder"):
        load_prompts(str(tmp_path / "list.txt"), mixture)


def test_wrong_embedding_width_is_named(mixture):
    """check_embeddings names the prompt and the shape the model takes."""
    prompts = load_prompts("toy", mixture)
    with pytest.raises(ValueError, match=r"prompt 0 \('toy prompt 0'\).*\(L, 16\)"):
        check_embeddings(prompts, text_len=8, text_dim=16)


@pytest.mark.parametrize("kind", ["text", "truncated", "list", "dict"])
def test_a_bad_embedding_file_is_one_sentence_naming_it(tmp_path, kind):
    """A text file, a truncated file, or a .pt holding a list or a dict among the embeddings: one sentence naming
    the file and the (L, text_dim) tensor expected, not torch's own error."""
    from tests.test_torch_files import assert_one_sentence_about, write_bad_torch_file

    torch.save(torch.zeros(2, 4), tmp_path / "a.pt")
    path = write_bad_torch_file(tmp_path / "b.pt", kind)
    with pytest.raises(ValueError) as error:
        load_prompts(str(tmp_path))
    assert str(error.value).startswith(f"prompt embedding {path} ")
    assert_one_sentence_about(error.value, path, kind, *(["an (L, text_dim) tensor"] if kind in ("list", "dict") else []))


def test_one_embedding_file_is_a_prompt_set_of_one(tmp_path):
    """--prompts NAME.pt: that embedding is the one prompt (text from NAME.txt, else NAME)."""
    torch.save(torch.ones(3, 4), tmp_path / "cat.pt")
    prompts = load_prompts(str(tmp_path / "cat.pt"))
    assert [(p.index, p.text, tuple(p.embedding.shape)) for p in prompts] == [(0, "cat", (3, 4))]


def test_a_list_file_that_is_not_text_is_named(tmp_path):
    """A binary file (here a torch file without the .pt suffix) as the prompt list: one sentence naming it."""
    torch.save(torch.ones(3, 4), tmp_path / "prompts.bin")
    with pytest.raises(ValueError, match=rf"^--prompts {tmp_path / 'prompts.bin'} is not a text list of prompts"):
        load_prompts(str(tmp_path / "prompts.bin"))
