"""Few-step generation with a distilled student (the inference CLI).

    python -m rcm.generate --dit_path demo_out/toy_rcm --toy_prompt 3 --num_steps 4 --num_samples 8
    python -m rcm.generate --dit_path student.pth --model wan2.1-t2v-1.3B --embedding prompt.pt --resolution 480p

Today this writes latents (a `.pt` tensor N×C×T×H×W); turning a prompt into an embedding and latents
into video needs the umT5 encoder and the Wan VAE, which arrive with the VAE / text-encoder issue.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rcm.checkpoint.weights import load_model_weights
from rcm.config import load_config
from rcm.distill.sampler import sample_student
from rcm.distill.trigflow import denoise

# Latent grid of Wan2.1's VAE (4× temporal, 8× spatial compression) for 81 frames.
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def latent_shape_for(resolution: str, aspect_ratio: str, frames: int = 81, channels: int = 16) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latent of a video at a resolution and aspect ratio ("16:9" or "9:16")."""
    height, width = RESOLUTIONS[resolution]
    if aspect_ratio == "9:16":
        height, width = width, height
    elif aspect_ratio != "16:9":
        raise ValueError(f"aspect ratio must be 16:9 or 9:16, got {aspect_ratio}")
    return channels, (frames - 1) // 4 + 1, height // 8, width // 8


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="rcm-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit_path", required=True, help="student weights: a run directory, a DCP checkpoint or a .pth file")
    parser.add_argument("--model", default=None, help="model preset (configs/model/NAME.yaml); default: the run's own config")
    parser.add_argument("--weights", choices=["ema", "student"], default="ema")
    parser.add_argument("--num_steps", type=int, default=4, choices=[1, 2, 3, 4])
    parser.add_argument("--sigma_max", type=float, default=80.0, help="initial noise level (larger, e.g. 1600: less diversity, more quality)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding", help="text embedding .pt (tokens × text_dim) of the prompt")
    parser.add_argument("--toy_prompt", type=int, help="toy runs: use the embedding of this toy prompt (from the run's ground truth)")
    parser.add_argument("--prompt", help="a text prompt (needs the umT5 encoder, not available yet: use --embedding)")
    parser.add_argument("--resolution", default=None, choices=sorted(RESOLUTIONS), help="video resolution (Wan models)")
    parser.add_argument("--aspect_ratio", default="16:9", choices=["16:9", "9:16"])
    parser.add_argument("--latent_shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), help="latent shape (default: the run's data.latent_shape)")
    parser.add_argument("--save_path", default="samples.pt", help="output file for the latents")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    if args.prompt and not args.embedding:
        parser.error("--prompt needs the umT5 text encoder, which this version does not ship yet; pass --embedding FILE.pt")
    if not args.embedding and args.toy_prompt is None:
        parser.error("--embedding (or --toy_prompt for toy runs) is required")
    from rcm.evaluate import load_run_config
    from rcm.train import build_network

    dit_path = Path(args.dit_path)
    run_cfg = load_run_config(dit_path) if (dit_path / "config.yaml").is_file() else None
    if args.model:
        model_cfg = load_config([f"model={args.model}", "distill.method=flow_matching"]).model
    elif run_cfg is not None:
        model_cfg = run_cfg.model
    else:
        parser.error("--model is required when --dit_path is not a run directory")
    if args.latent_shape:
        shape = tuple(args.latent_shape)
    elif args.resolution:
        shape = latent_shape_for(args.resolution, args.aspect_ratio, channels=model_cfg.in_channels)
    elif run_cfg is not None:
        shape = tuple(run_cfg.data.latent_shape)
    else:
        parser.error("give --latent_shape or --resolution")

    network = build_network(model_cfg)
    load_model_weights(network, dit_path, prefer=args.weights)
    network = network.to(args.device).eval().requires_grad_(False)
    if args.embedding:
        embedding = torch.load(args.embedding, map_location="cpu", weights_only=True).float()
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
    if embedding.shape[-1] != model_cfg.text_dim or embedding.shape[1] > model_cfg.text_len:
        parser.error(f"--embedding {args.embedding} has shape {tuple(embedding.shape)}; the model needs ≤{model_cfg.text_len} tokens × {model_cfg.text_dim}")
    generator = torch.Generator(args.device).manual_seed(args.seed)
    noise = torch.randn((args.num_samples, *shape), generator=generator, device=args.device)
    context = embedding.to(args.device).expand(args.num_samples, -1, -1)
    latents = sample_student(lambda x, t, c: denoise(network, x, t, c), noise, context, args.num_steps, args.sigma_max, generator)
    Path(args.save_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(latents.cpu(), args.save_path)
    print(f"wrote {args.num_samples} latent(s) of shape {tuple(shape)} to {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
