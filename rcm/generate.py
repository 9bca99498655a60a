"""Few-step text-to-video generation with a distilled student: prompt → umT5 embedding → 1–4 student steps
→ Wan VAE decode → mp4.

    python -m rcm.generate --dit_path rCM_Wan2.1_T2V_1.3B_480p.pt --model wan2.1-t2v-1.3B \\
        --t5_path Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \\
        --tokenizer_path Wan2.1-T2V-1.3B/google/umt5-xxl --vae_path Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \\
        --prompt "A red fox runs through fresh snow at sunrise" --num_samples 2 --save_path out/fox.mp4
    python -m rcm.generate --dit_path runs/wan_rcm --prompts_file prompts.txt ...   # one prompt per line
    python -m rcm.generate --dit_path demo_out/toy_rcm --toy_prompt 3 --num_samples 8   # toy run: latents

Outputs. With --vae_path, one mp4 per (prompt, sample) and its latent next to it (same name, .pt, a
1×C×T×H×W tensor): --save_path itself for a single video, else its name plus _promptP / _sampleS.
Without --vae_path, or with a --save_path ending in .pt, only latents: one N×C×T×H×W tensor (several
prompts: prompt-major, N = prompts × samples).

Reproducibility: sample s of every prompt starts from the noise of seed --seed + s, so a video depends
only on its prompt, the seed, its sample index and the settings, not on the other prompts.
Memory: the stages run one after the other (encode text, sample, decode + write), and with --offload
(default on CUDA) each model is freed before the next one loads, so the 11 GB umT5-XXL, the DiT and the
VAE never share the GPU.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rcm.checkpoint.weights import describe_object, load_torch_file
from rcm.cli_errors import UserError, debug_enabled, run_cli
from rcm.config import config_from_json, json_argument, load_model_preset, model_presets
from rcm.distill.sampler import sample_student, student_time_grid
from rcm.distill.trigflow import denoise
from rcm.eval.networks import DTYPES, NetworkSource, is_run_directory, load_run_config, network_dtype
from rcm.models.text_encoder import TOKENIZER_FILE, TextEncoder, resolve_tokenizer_file
from rcm.models.umt5 import OFFICIAL_CHECKPOINT_NAME as UMT5_CHECKPOINT_NAME
from rcm.models.umt5 import UMT5Config
from rcm.models.wan_vae import OFFICIAL_CHECKPOINT_NAME as VAE_CHECKPOINT_NAME
from rcm.models.wan_vae import WanVAE, WanVAEConfig, load_wan_vae
from rcm.parallel.compile import DEFAULT_VAE_CHUNK_FRAMES, speed_up_vae_decoder
from rcm.torch_files import torch_file_problem
from rcm.video import require_video_writer, write_mp4

# (height, width) of the 16:9 videos Wan2.1 is trained on; 9:16 swaps them.
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
DEFAULT_RESOLUTION = "480p"
DEFAULT_NUM_FRAMES = 81


def video_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in pixels of a video at a resolution ("480p", "720p") and aspect ratio ("16:9", "9:16")."""
    height, width = RESOLUTIONS[resolution]
    if aspect_ratio == "9:16":
        return width, height
    if aspect_ratio != "16:9":
        raise ValueError(f"aspect ratio must be 16:9 or 9:16, got {aspect_ratio}")
    return height, width


def video_paths(save_path: Path, num_prompts: int, num_samples: int) -> list[Path]:
    """The mp4 of each (prompt, sample), prompt-major: ``save_path`` for a single video, else its stem
    plus _promptP and/or _sampleS (only the indices that vary, zero-padded)."""
    if num_prompts * num_samples == 1:
        return [save_path]
    prompt_digits, sample_digits = len(str(num_prompts - 1)), len(str(num_samples - 1))
    paths = []
    for prompt_index in range(num_prompts):
        for sample_index in range(num_samples):
            parts = []
            if num_prompts > 1:
                parts.append(f"prompt{prompt_index:0{prompt_digits}d}")
            if num_samples > 1:
                parts.append(f"sample{sample_index:0{sample_digits}d}")
            paths.append(save_path.with_name(f"{save_path.stem}_{'_'.join(parts)}{save_path.suffix}"))
    return paths


def read_prompts_file(path: str) -> list[str]:
    """The non-empty lines of a prompts file, stripped."""
    file = Path(path)
    if not file.exists() or file.is_dir():  # not is_file(): a pipe (<(...), /dev/stdin) is fine
        raise FileNotFoundError(f"--prompts_file {file} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {file} holds no prompt; write one prompt per line")
    return prompts


def free_memory(device: torch.device) -> None:
    """Return memory of dropped models: Python's cycles first, then the CUDA caching allocator's blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of rcm-generate."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="rcm-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("student")
    model.add_argument("--dit_path", required=True,
                       help="student weights: a .pth/.pt file (e.g. rCM_Wan2.1_T2V_1.3B_480p.pt), .safetensors (a file or a "
                            "directory of shards), a DCP checkpoint "
                            "or a training run directory")
    model.add_argument("--model", default=None,
                       help=f"model preset, one of {', '.join(model_presets())} (configs/model/NAME.yaml); "
                            "default: the run directory's own model")
    model.add_argument("--weights", choices=["ema", "student"], default="ema",
                       help="which weights of a training checkpoint (default: %(default)s)")
    model.add_argument("--num_steps", type=int, default=4, choices=[1, 2, 3, 4], help="student steps (default: 4)")
    model.add_argument("--sigma_max", type=float, default=80.0,
                       help="initial noise level (default: %(default)s; larger, e.g. 1600: less diversity, more quality)")
    model.add_argument("--mid_t", type=float, nargs="+", default=None, metavar="T",
                       help="intermediate TrigFlow times; n steps use the first n-1 (default: the paper's 1.5 1.4 1.0)")

    text = parser.add_argument_group("text (give exactly one of --prompt, --prompts_file, --embedding, --toy_prompt)")
    source = text.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a text prompt (needs --t5_path and --tokenizer_path)")
    source.add_argument("--prompts_file", help="a text file with one prompt per line (empty lines are skipped)")
    source.add_argument("--embedding", help="precomputed text embedding .pt: (tokens, text_dim), or (prompts, tokens, "
                                            "text_dim) for several prompts")
    source.add_argument("--toy_prompt", type=int, help="toy runs: the embedding of this toy prompt (from the run's "
                                                      "ground truth)")
    text.add_argument("--t5_path", help=f"umT5-XXL encoder weights, {UMT5_CHECKPOINT_NAME} from the Wan2.1 release")
    text.add_argument("--tokenizer_path", help=f"local google/umt5-xxl tokenizer directory (holding {TOKENIZER_FILE}), "
                                               "in the Wan2.1 release as google/umt5-xxl/")

    video = parser.add_argument_group("video")
    video.add_argument("--vae_path", help=f"Wan VAE weights, {VAE_CHECKPOINT_NAME} from the Wan2.1 release; without it "
                                          "only latents are written")
    video.add_argument("--resolution", default=None, choices=sorted(RESOLUTIONS),
                       help=f"video resolution (default: a run directory's latent shape, else {DEFAULT_RESOLUTION})")
    video.add_argument("--aspect_ratio", default="16:9", choices=["16:9", "9:16"], help="width:height (default: 16:9)")
    video.add_argument("--num_frames", type=int, default=None,
                       help=f"frames, 1 + 4k (default: {DEFAULT_NUM_FRAMES}, 5 s at 16 fps)")
    video.add_argument("--fps", type=int, default=16, help="frame rate of the mp4 (default: %(default)s, Wan2.1's)")
    video.add_argument("--latent_shape", type=int, nargs=4, metavar=("C", "T", "H", "W"),
                       help="latent shape, overriding --resolution and --num_frames (non-official sizes)")
    video.add_argument("--save_path", default=None,
                       help="output .mp4 (with --vae_path) or .pt (latents only); default: samples.mp4 with "
                            "--vae_path, else samples.pt")

    run = parser.add_argument_group("run")
    run.add_argument("--num_samples", type=int, default=1, help="videos per prompt (default: 1)")
    run.add_argument("--seed", type=int, default=0, help="sample s uses the noise of seed + s (default: 0)")
    run.add_argument("--device", default=default_device, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="DiT and text-encoder dtype (default: bfloat16 on CUDA, float32 on CPU)")
    run.add_argument("--vae_dtype", choices=sorted(DTYPES), default="float32",
                     help="VAE dtype (default: %(default)s, as Wan2.1 decodes)")
    run.add_argument("--compile_vae", action="store_true",
                     help="torch.compile the VAE decoder, with its 3x3x3 convolutions as 2-D convolutions over frames, "
                          f"decoding {DEFAULT_VAE_CHUNK_FRAMES} latent frames per chunk (81 frames at 480p in bf16 on an "
                          "H100: 1.64 -> 0.78 s, peak 4.4 -> 15.6 GiB; the first video compiles)")
    run.add_argument("--vae_chunk_frames", type=int, default=None, metavar="K",
                     help="latent frames the VAE decodes at a time: more is faster and takes more memory (default: "
                          f"{DEFAULT_VAE_CHUNK_FRAMES} with --compile_vae, else 1 as Wan2.1)")
    run.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                     help="free each model when its stage is done (umT5 before the DiT loads, the DiT before the "
                          "VAE); default: on for CUDA")

    sizes = parser.add_argument_group("non-official model sizes (tests, small models)")
    sizes.add_argument("--t5_config", type=json_argument, default=None, metavar="JSON",
                       help="JSON object of UMT5Config fields (default: umT5-XXL, what Wan2.1 uses)")
    sizes.add_argument("--vae_config", type=json_argument, default=None, metavar="JSON",
                       help="JSON object of WanVAEConfig fields (default: the Wan2.1 VAE)")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail with one sentence on options that cannot work together, before anything is loaded."""
    if (args.prompt is not None or args.prompts_file) and not (args.t5_path and args.tokenizer_path):
        flag = "--prompt" if args.prompt is not None else "--prompts_file"
        parser.error(f"{flag} needs the umT5 text encoder: pass --t5_path .../{UMT5_CHECKPOINT_NAME} and "
                     "--tokenizer_path .../google/umt5-xxl (both in the Wan2.1 release), or a precomputed --embedding")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.fps < 1:
        parser.error(f"--fps must be at least 1, got {args.fps}")
    if args.vae_chunk_frames is not None and args.vae_chunk_frames < 1:
        parser.error(f"--vae_chunk_frames must be at least 1, got {args.vae_chunk_frames}")
    if not args.sigma_max > 0:
        parser.error(f"--sigma_max must be positive, got {args.sigma_max}")
    try:
        student_time_grid(args.num_steps, args.sigma_max, args.mid_t)
    except ValueError as error:
        parser.error(f"--mid_t: {error}")
    if args.model is not None and args.model not in model_presets():
        parser.error(f"--model {args.model}: no such preset; choose one of {', '.join(model_presets())} "
                     "(configs/model/NAME.yaml)")
    if args.save_path is None:
        args.save_path = "samples.mp4" if args.vae_path else "samples.pt"
    suffix = Path(args.save_path).suffix.lower()
    if suffix not in (".mp4", ".pt"):
        parser.error(f"--save_path {args.save_path} must end in .mp4 (video, needs --vae_path) or .pt (latents)")
    if suffix == ".mp4" and not args.vae_path:
        parser.error(f"--save_path {args.save_path} is a video: pass --vae_path .../{VAE_CHECKPOINT_NAME} to decode "
                     "the latents, or save latents with a .pt path")


def check_files(args: argparse.Namespace, make_video: bool) -> None:
    """Raise FileNotFoundError naming the flag and the expected file for every missing input, before any model loads
    (a missing VAE should not surface after minutes of sampling)."""
    if not Path(args.dit_path).exists():
        raise FileNotFoundError(f"--dit_path {args.dit_path} does not exist; pass the student's .pth/.pt (e.g. "
                                "rCM_Wan2.1_T2V_1.3B_480p.pt), a DCP checkpoint directory or a training run directory")
    if args.t5_path and (args.prompt is not None or args.prompts_file) and not Path(args.t5_path).is_file():
        raise FileNotFoundError(f"--t5_path {args.t5_path} does not exist; pass {UMT5_CHECKPOINT_NAME} from the "
                                "Wan2.1 release (e.g. the Wan2.1-T2V-1.3B folder)")
    if args.tokenizer_path and (args.prompt is not None or args.prompts_file):
        try:
            resolve_tokenizer_file(args.tokenizer_path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--tokenizer_path: {error}") from None
    if make_video and not Path(args.vae_path).is_file():
        raise FileNotFoundError(f"--vae_path {args.vae_path} does not exist; pass {VAE_CHECKPOINT_NAME} from the "
                                "Wan2.1 release (it ships with every Wan2.1 model)")
    # A file that cannot be a torch checkpoint at all (a text file, an empty one) fails now, not after sampling.
    for flag, path, needed in (("--vae_path", args.vae_path, make_video),
                               ("--t5_path", args.t5_path, bool(args.t5_path) and (args.prompt is not None or args.prompts_file))):
        problem = torch_file_problem(path) if needed else None
        if problem:
            raise ValueError(f"{flag}: {problem}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parse, check, run; exits 2 with a one-line message on a missing or wrong file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        vae_config = config_from_json(WanVAEConfig, args.vae_config, "--vae_config") or WanVAEConfig()
        t5_config = config_from_json(UMT5Config, args.t5_config, "--t5_config")
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    step = vae_config.temporal_compression
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % step):
        below = 1 + step * ((max(args.num_frames, 1) - 1) // step)
        parser.error(f"--num_frames must be 1 + {step}k (the VAE keeps the first frame, then compresses {step} "
                     f"frames into one latent frame), got {args.num_frames}; e.g. {below} or {below + step}")
    try:
        return generate(parser, args, vae_config, t5_config)
    except (FileNotFoundError, ValueError, ImportError, UserError) as error:  # a damaged checkpoint is a UserError
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def generate(parser: argparse.ArgumentParser, args: argparse.Namespace, vae_config: WanVAEConfig,
             t5_config: UMT5Config | None) -> int:
    """Encode the text, sample every (prompt, sample), then decode and write the videos (or save latents)."""
    make_video = bool(args.vae_path) and Path(args.save_path).suffix.lower() == ".mp4"
    if make_video:
        require_video_writer()  # before minutes of sampling, not after
    check_files(args, make_video)
    device = torch.device(args.device)
    dtype = network_dtype(args.dtype, device)
    offload = args.offload if args.offload is not None else device.type == "cuda"

    run_cfg = load_run_config(args.dit_path) if is_run_directory(args.dit_path) else None
    if args.model is None and run_cfg is None:
        parser.error("--model is required when --dit_path is not a run directory (e.g. --model wan2.1-t2v-1.3B)")
    model_cfg = load_model_preset(args.model) if args.model else run_cfg.model
    shape = latent_shape(args, model_cfg, run_cfg, vae_config)
    if make_video and vae_config.z_dim != model_cfg.out_channels:
        raise ValueError(f"the VAE's latents have {vae_config.z_dim} channels but the DiT makes "
                         f"{model_cfg.out_channels}; use the VAE of the DiT's family (or a matching --vae_config)")
    from_text = args.prompt is not None or bool(args.prompts_file)
    if from_text:
        prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts_file)
        encoder_dim = (t5_config or UMT5Config()).dim
        if encoder_dim != model_cfg.text_dim:
            raise ValueError(f"the umT5 encoder gives {encoder_dim}-dim embeddings but the DiT's text_dim is "
                             f"{model_cfg.text_dim}; pass the encoder this DiT was trained with (--t5_config)")
    else:
        embeddings = load_embeddings(parser, args, run_cfg)
        check_embeddings(embeddings, model_cfg)
        contexts = list(embeddings.split(1))
        label = f"toy prompt {args.toy_prompt}" if args.toy_prompt is not None else f"{args.embedding} row"
        prompts = [f"{label} {i}" if len(contexts) > 1 else label for i in range(len(contexts))]

    stages = (["encode text"] if from_text else []) + ["sample", "decode + write mp4" if make_video else "write latents"]
    seconds: dict[str, float] = {}
    kept: list[Any] = []  # the models that --no-offload keeps loaded to the end
    # The bar closes on errors too, so that an error message starts on a line of its own.
    with tqdm(total=len(stages), desc="generate", unit="stage", file=sys.stderr) as progress:
        if from_text:
            progress.set_postfix_str("encode text")
            started = time.perf_counter()
            text_encoder = TextEncoder.from_files(args.t5_path, args.tokenizer_path, device=device, dtype=dtype,
                                                  text_len=model_cfg.text_len, config=t5_config)
            contexts = encode_prompts(text_encoder, prompts)
            kept.append(text_encoder)
            del text_encoder
            release_models(kept, offload, device)
            seconds["encode text"] = time.perf_counter() - started
            progress.update()

        progress.set_postfix_str("sample")
        started = time.perf_counter()
        try:
            network = NetworkSource(Path(args.dit_path), model_cfg).load(args.weights, device, dtype)
        except ValueError as error:
            if isinstance(error, UserError):  # not a mismatch: the file is no checkpoint, or a damaged one
                raise UserError(f"--dit_path: {error}") from error
            which = f"--model {args.model}" if args.model else "the run's model"
            raise ValueError(f"--dit_path: {error}. Is {which} the network of this checkpoint? (presets: "
                             f"{', '.join(model_presets())})") from None
        latents = sample_latents(network, contexts, args.num_samples, shape, args, device)
        raise_on_non_finite_latents(latents, args)
        kept.append(network)
        del network
        release_models(kept, offload, device)
        seconds["sample"] = time.perf_counter() - started
        progress.update()

        if not make_video:
            progress.set_postfix_str("write latents")
            save_path = Path(args.save_path)
            save_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.cat(latents), save_path)
            progress.update()
        else:
            progress.set_postfix_str("decode + write mp4")
            started = time.perf_counter()
            paths = video_paths(Path(args.save_path), len(prompts), args.num_samples)
            # The latents first: a failed VAE load or decode loses no sampling work.
            for path, latent in zip(paths, latents):
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(latent, path.with_suffix(".pt"))
            vae = load_wan_vae(args.vae_path, device=device, dtype=DTYPES[args.vae_dtype], config=vae_config)
            if args.compile_vae:
                speed_up_vae_decoder(vae)
            chunk_frames = args.vae_chunk_frames or (DEFAULT_VAE_CHUNK_FRAMES if args.compile_vae else 1)
            frames, height, width = decode_and_write(vae, latents, paths, args.fps, device, chunk_frames)
            seconds["decode + write"] = time.perf_counter() - started
            progress.update()

    if not make_video:
        order = f" (prompt-major: {len(prompts)} prompts × {args.num_samples})" if len(prompts) > 1 else ""
        print(f"wrote {len(latents)} latent(s) of shape {tuple(shape)}{order} to {save_path} ({_timings(seconds)})")
        return 0
    jobs = [(p, s) for p in range(len(prompts)) for s in range(args.num_samples)]
    for (prompt_index, sample_index), path in zip(jobs, paths):
        text = prompts[prompt_index]
        print(f"{path}  (prompt {prompt_index}, sample {sample_index}: {text[:60]}{'…' if len(text) > 60 else ''})")
    print(f"wrote {len(paths)} video(s) of {frames} frames at {width}×{height}, {args.fps} fps, each with its "
          f"latent (.pt) ({_timings(seconds)})")
    return 0


def raise_on_non_finite_latents(latents: list[torch.Tensor], args: argparse.Namespace) -> None:
    """Refuse to write NaN/Inf latents: the weights were checked finite, so the sampling itself overflowed."""
    bad = sum(1 for latent in latents if not bool(torch.isfinite(latent).all()))
    if bad:
        raise UserError(f"sampling gave non-finite latents (NaN or Inf) for {bad} of {len(latents)} sample(s) although "
                        f"the weights of --dit_path {args.dit_path} are finite; nothing was written (try --dtype float32)")


def release_models(kept: list[Any], offload: bool, device: torch.device) -> None:
    """With offload, drop the models in ``kept`` and give their memory back; without, keep holding them."""
    if offload:
        kept.clear()
        free_memory(device)


def encode_prompts(text_encoder: TextEncoder, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's float32 CPU embedding (1, tokens, dim), trimmed to its tokens as Wan's pipeline does."""
    contexts = []
    # One prompt at a time: batching changes the float rounding, and a prompt's video should not depend
    # on the other lines of the prompts file. Trimming changes nothing (the DiT zero-pads the context back
    # to text_len) but keeps a long prompts file small in memory.
    for prompt in tqdm(prompts, desc="encode text", unit="prompt", leave=False, file=sys.stderr):
        embeddings, lengths = text_encoder.encode([prompt])
        contexts.append(embeddings[:, : int(lengths[0])].float().cpu())
    return contexts


def sample_latents(network: torch.nn.Module, contexts: list[torch.Tensor], num_samples: int, shape: tuple[int, ...],
                   args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """One (1, C, T, H, W) float32 CPU latent per (prompt, sample), prompt-major, from --num_steps student steps;
    ``contexts`` holds each prompt's text embedding (1, tokens, text_dim)."""
    latents = []
    jobs = [(p, s) for p in range(len(contexts)) for s in range(num_samples)]
    for prompt_index, sample_index in tqdm(jobs, desc="sample", unit="video", leave=False, file=sys.stderr):
        # One generator per sample: its noise and the re-noising between steps depend on seed + s alone.
        generator = torch.Generator(device).manual_seed(args.seed + sample_index)
        noise = torch.randn((1, *shape), generator=generator, device=device)
        context = contexts[prompt_index].to(device)
        latent = sample_student(lambda x, t, c: denoise(network, x, t, c), noise, context, args.num_steps,
                                args.sigma_max, generator, args.mid_t)
        latents.append(latent.float().cpu())
    return latents


@torch.no_grad()
def decode_and_write(vae: WanVAE, latents: list[torch.Tensor], paths: list[Path], fps: int,
                     device: torch.device, chunk_frames: int = 1) -> tuple[int, int, int]:
    """Decode each latent (``chunk_frames`` latent frames at a time) and write it as an mp4 at once (one video in
    memory at a time); (frames, height, width)."""
    for path, latent in tqdm(list(zip(paths, latents)), desc="decode", unit="video", leave=False, file=sys.stderr):
        video = vae.decode(latent.to(device), chunked=True, chunk_frames=chunk_frames)[0]
        write_mp4(video, path, fps=fps)
    return tuple(video.shape[1:])


def check_embeddings(embeddings: torch.Tensor, model_cfg: Any) -> None:
    """Raise ValueError when text embeddings (prompts, tokens, text_dim) do not fit the DiT's text_len and text_dim."""
    if embeddings.shape[-1] != model_cfg.text_dim or embeddings.shape[1] > model_cfg.text_len:
        raise ValueError(f"text embeddings of shape {tuple(embeddings.shape)} do not fit the DiT: it needs "
                         f"≤{model_cfg.text_len} tokens × {model_cfg.text_dim}")


def _timings(seconds: dict[str, float]) -> str:
    return ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())


def latent_shape(args: argparse.Namespace, model_cfg: Any, run_cfg: Any, vae_config: WanVAEConfig) -> tuple[int, ...]:
    """(C, T, H, W) to sample: --latent_shape; else a run's data.latent_shape unless --resolution or --num_frames
    is given; else the latent of the video size (default 480p, 81 frames)."""
    if args.latent_shape:
        shape = tuple(args.latent_shape)
        if shape[0] != model_cfg.in_channels:
            raise ValueError(f"--latent_shape {shape} has {shape[0]} channels but the DiT takes {model_cfg.in_channels}")
        return shape
    if args.resolution is None and args.num_frames is None and run_cfg is not None \
            and run_cfg.get("data") and run_cfg.data.get("latent_shape"):
        return tuple(run_cfg.data.latent_shape)
    height, width = video_size(args.resolution or DEFAULT_RESOLUTION, args.aspect_ratio)
    _, frames, latent_height, latent_width = vae_config.latent_shape(args.num_frames or DEFAULT_NUM_FRAMES, height, width)
    return model_cfg.in_channels, frames, latent_height, latent_width


def load_embeddings(parser: argparse.ArgumentParser, args: argparse.Namespace, run_cfg: Any) -> torch.Tensor:
    """(prompts, tokens, text_dim) float32 from --embedding or --toy_prompt."""
    if args.embedding:
        if not Path(args.embedding).is_file():
            raise FileNotFoundError(f"--embedding {args.embedding} does not exist; make one with "
                                    "tools/encode_negative_prompt.py --prompt TEXT, or pass --prompt with --t5_path")
        try:
            embedding = load_torch_file(args.embedding)
        except UserError as error:
            raise UserError(f"--embedding: {error}") from None
        if not torch.is_tensor(embedding) or not embedding.is_floating_point():
            raise UserError(f"--embedding {args.embedding} holds {describe_object(embedding)}, not a float tensor of "
                            "text embeddings (tokens, text_dim) or (prompts, tokens, text_dim)")
        embedding = embedding.float().clone()  # not a view of the memory-mapped file
    else:
        from rcm.data.toy import ToyMixture

        if run_cfg is None or not run_cfg.data.get("ground_truth"):
            parser.error("--toy_prompt needs --dit_path to be a toy run directory")
        mixture = ToyMixture.load(run_cfg.data.ground_truth)
        if not 0 <= args.toy_prompt < len(mixture.embeddings):
            parser.error(f"--toy_prompt must be in 0..{len(mixture.embeddings) - 1}")
        embedding = mixture.embeddings[args.toy_prompt].float()
    if embedding.dim() == 2:
        embedding = embedding.unsqueeze(0)
    if embedding.dim() != 3:
        raise ValueError(f"--embedding {args.embedding} has shape {tuple(embedding.shape)}; expected (tokens, "
                         "text_dim) or (prompts, tokens, text_dim)")
    return embedding


if __name__ == "__main__":
    sys.exit(run_cli(main, "rcm.generate"))
