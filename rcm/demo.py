"""The end-to-end demo on the embedded toy data (the README's main command).

Builds the toy dataset, pretrains the toy teacher (flow matching), distills it with rCM, evaluates the
teacher (50 steps, CFG) and the student (1, 2, 4 steps) on the ground-truth metrics, prints a table
and saves a PNG of samples against the true modes. Each stage resumes from what is already in
``--out``, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from rcm.config import load_config
from rcm.data.toy import ToyMixture, ToyMixtureConfig, build_toy_dataset
from rcm.evaluate import generate_toy_samples, load_network, markdown_table, summarize
from rcm.data.metrics import toy_metrics
from rcm.plots import plot_toy_samples
from rcm.report import write_report
from rcm.train import train

# Student intermediate times that suit the toy (a scan of the demo student: README).
TOY_MID_TIMES = (1.2, 0.8, 0.5)

log = logging.getLogger("rcm.demo")


def build_data(out: Path, num_samples: int) -> Path:
    """Write the toy shards once (skipped when they are already complete)."""
    data_dir = out / "toy_data"
    if (data_dir / "ground_truth.pt").is_file() and any(data_dir.glob("shard-*.tar")):
        return data_dir
    build_toy_dataset(data_dir, num_samples=num_samples, samples_per_shard=max(1, num_samples // 8), mixture_config=ToyMixtureConfig(), seed=0)
    return data_dir


def run_stage(experiment: str, out: Path, data_dir: Path, overrides: list[str]) -> Path:
    """Train one experiment into ``out/<experiment>`` (resuming if it already has checkpoints)."""
    run_dir = out / experiment
    cfg = load_config([f"experiment={experiment}", f"run_dir={run_dir}", f"data.shards={data_dir}", *overrides])
    started = time.time()
    train(cfg)
    print(f"[demo] {experiment}: {cfg.train.max_iters} iterations done ({time.time() - started:.0f} s)", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="rcm-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="working directory for data, runs and results")
    parser.add_argument("--method", default="rcm", choices=["rcm", "scm", "dmd", "dcm"], help="distillation method")
    parser.add_argument("--teacher-iters", type=int, default=None, help="override toy_teacher's train.max_iters")
    parser.add_argument("--distill-iters", type=int, default=None, help="override the distillation's train.max_iters")
    parser.add_argument("--num-samples", type=int, default=16384, help="toy training samples to write")
    parser.add_argument("--samples-per-class", type=int, default=256, help="evaluation samples per prompt")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests use it); the numbers mean nothing")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override for the distillation, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.quick:
        args.teacher_iters = args.teacher_iters or 20
        args.distill_iters = args.distill_iters or 12
        args.num_samples = min(args.num_samples, 256)
        args.samples_per_class = min(args.samples_per_class, 16)
        args.teacher_steps = min(args.teacher_steps, 8)
    out = Path(args.out).resolve()  # run configs record absolute data paths
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    data_dir = build_data(out, args.num_samples)
    teacher_overrides = [f"train.max_iters={args.teacher_iters}"] if args.teacher_iters else []
    if args.quick:
        teacher_overrides += ["train.batch_size=8", "train.save_every=10"]
    teacher_dir = run_stage("toy_teacher", out, data_dir, teacher_overrides)

    distill_overrides = [f"distill.teacher_checkpoint={teacher_dir}", *args.override]
    if args.distill_iters:
        distill_overrides.append(f"train.max_iters={args.distill_iters}")
    if args.quick:
        distill_overrides += ["train.batch_size=4", "distill.tangent_warmup=4", "train.save_every=6"]
    student_dir = run_stage(f"toy_{args.method}", out, data_dir, distill_overrides)

    mixture = ToyMixture.load(data_dir / "ground_truth.pt")
    teacher, teacher_cfg = load_network(teacher_dir)
    student, student_cfg = load_network(student_dir)
    guidance = student_cfg.distill.guidance_scale
    text_len = student_cfg.model.text_len
    rows, panels = [], {}
    print(f"[demo] evaluating on {args.samples_per_class} samples per prompt ...", flush=True)
    samples, ids = generate_toy_samples(
        teacher, mixture, args.samples_per_class, seed=1, teacher_steps=args.teacher_steps, guidance_scale=guidance,
        text_len=text_len, progress=True,
    )
    rows.append({"model": f"teacher (CFG {guidance:g})", "steps": args.teacher_steps, **summarize(toy_metrics(samples, ids, mixture))})
    panels[f"teacher, {args.teacher_steps} steps"] = (samples, ids)
    # The teacher at the student's budgets shows what distillation buys.
    for steps in (1, 2, 4):
        samples, ids = generate_toy_samples(
            teacher, mixture, args.samples_per_class, seed=1, teacher_steps=steps, guidance_scale=guidance, text_len=text_len
        )
        rows.append({"model": f"teacher (CFG {guidance:g})", "steps": steps, **summarize(toy_metrics(samples, ids, mixture))})
    for steps in (1, 2, 4):
        samples, ids = generate_toy_samples(student, mixture, args.samples_per_class, seed=1, student_steps=steps, text_len=text_len)
        rows.append({"model": f"{args.method} student", "steps": steps, **summarize(toy_metrics(samples, ids, mixture))})
        panels[f"{args.method} student, {steps} step{'s' if steps > 1 else ''}"] = (samples, ids)
    # The paper's intermediate times (1.5, 1.4, 1.0) suit Wan's video latents; earlier ones suit this toy (README).
    for steps in (2, 4):
        samples, ids = generate_toy_samples(student, mixture, args.samples_per_class, seed=1, student_steps=steps,
                                            text_len=text_len, mid_times=TOY_MID_TIMES)
        label = "/".join(f"{t:g}" for t in TOY_MID_TIMES[: steps - 1])
        rows.append({"model": f"{args.method} student, mid-times {label}", "steps": steps,
                     **summarize(toy_metrics(samples, ids, mixture))})

    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    plot = plot_toy_samples(panels, mixture, out / "samples.png")
    write_report(student_dir, out)  # the distillation's curves: losses, gradient norms, throughput
    print("\n" + table)
    print(f"\n[demo] done in {time.time() - started:.0f} s: table {out / 'results.md'}, plot {plot}, "
          f"curves {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
