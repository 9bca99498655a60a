"""Evaluate a trained student (1–4 steps) or teacher (N Euler steps with CFG) on the toy's ground truth.

    python -m rcm.evaluate --run runs/toy_rcm --steps 1 2 4
    python -m rcm.evaluate --run runs/toy_teacher --teacher-steps 50 --guidance 2.0

Samples are drawn per prompt with a seed derived from (seed, prompt index), so results do not depend
on batch size. Writes ``eval.json`` and ``eval.md`` into ``--out`` (default: the run directory).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rcm.checkpoint.weights import load_model_weights
from rcm.data.metrics import toy_metrics
from rcm.data.toy import ToyMixture
from rcm.distill.sampler import sample_student, sample_teacher
from rcm.distill.trigflow import denoise, guided_denoise, pad_tokens


def load_run_config(run_dir: str | Path) -> Any:
    """The resolved config a training run saved next to its checkpoints."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return OmegaConf.load(path)


def load_network(run_dir: str | Path, weights: str = "ema", device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The run's network with its EMA (or raw student) weights, in eval mode."""
    from rcm.train import build_network

    cfg = load_run_config(run_dir)
    network = build_network(cfg.model)
    load_model_weights(network, run_dir, prefer=weights)
    return network.to(device).eval().requires_grad_(False), cfg


@torch.no_grad()
def generate_toy_samples(
    network: torch.nn.Module,
    mixture: ToyMixture,
    samples_per_class: int,
    seed: int,
    student_steps: int | None = None,
    teacher_steps: int = 50,
    guidance_scale: float = 1.0,
    shift: float = 5.0,
    sigma_max: float = 80.0,
    text_len: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples (N,C,T,H,W), class_ids (N,)) for every class; student if ``student_steps`` else teacher."""
    from tqdm import tqdm

    all_samples, all_ids = [], []
    negative = mixture.negative_embedding
    for class_id in tqdm(range(mixture.config.num_classes), disable=not progress, desc="sampling", leave=False):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + class_id)
        embedding = mixture.embeddings[class_id].unsqueeze(0)
        context = pad_tokens(embedding, text_len or embedding.shape[1]).expand(samples_per_class, -1, -1)
        noise = torch.randn((samples_per_class, *mixture.config.latent_shape), generator=generator)
        if student_steps:
            x0 = lambda x, t, ctx: denoise(network, x, t, ctx)  # noqa: E731
            samples = sample_student(x0, noise, context, student_steps, sigma_max, generator)
        else:
            x0 = lambda x, t, ctx: guided_denoise(network, x, t, ctx, negative, guidance_scale)  # noqa: E731
            samples = sample_teacher(x0, noise, context, teacher_steps, shift)
        all_samples.append(samples)
        all_ids.append(torch.full((samples_per_class,), class_id, dtype=torch.long))
    return torch.cat(all_samples), torch.cat(all_ids)


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """The averaged scalars of a toy_metrics result."""
    return {k: float(metrics[k]) for k in ("precision", "recall", "mode_kl")}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of {model, steps, precision, recall, mode_kl} as a markdown table."""
    lines = ["| model | steps | precision ↑ | mode recall ↑ | mode KL ↓ |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['mode_kl']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="rcm-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of a training run (holds config.yaml and checkpoints/)")
    parser.add_argument("--weights", choices=["ema", "student"], default="ema", help="which weights of the checkpoint to use")
    parser.add_argument("--steps", type=int, nargs="*", default=[1, 2, 4], help="student sampling steps to evaluate (1-4)")
    parser.add_argument("--teacher-steps", type=int, default=0, help="evaluate as a teacher with this many Euler steps instead")
    parser.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the run's distill.guidance_scale)")
    parser.add_argument("--shift", type=float, default=5.0, help="teacher sampling time shift")
    parser.add_argument("--sigma-max", type=float, default=80.0, help="student's initial noise level")
    parser.add_argument("--samples-per-class", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ground-truth", default=None, help="ground_truth.pt of the toy data (default: the run's data.ground_truth)")
    parser.add_argument("--out", default=None, help="where eval.json / eval.md go (default: the run directory)")
    args = parser.parse_args(argv)

    network, cfg = load_network(args.run, args.weights)
    ground_truth = args.ground_truth or cfg.data.get("ground_truth")
    if not ground_truth or not Path(ground_truth).is_file():
        parser.error(f"no toy ground truth found (got {ground_truth!r}); pass --ground-truth PATH")
    mixture = ToyMixture.load(ground_truth)
    rows = []
    if args.teacher_steps:
        guidance = cfg.distill.guidance_scale if args.guidance is None else args.guidance
        samples, ids = generate_toy_samples(
            network, mixture, args.samples_per_class, args.seed, None, args.teacher_steps, guidance, args.shift,
            text_len=cfg.model.text_len, progress=True,
        )
        rows.append({"model": "teacher", "steps": args.teacher_steps, **summarize(toy_metrics(samples, ids, mixture))})
    else:
        for steps in args.steps:
            samples, ids = generate_toy_samples(
                network, mixture, args.samples_per_class, args.seed, steps, sigma_max=args.sigma_max,
                text_len=cfg.model.text_len, progress=True,
            )
            rows.append({"model": "student", "steps": steps, **summarize(toy_metrics(samples, ids, mixture))})
    out = Path(args.out or args.run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    (out / "eval.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
