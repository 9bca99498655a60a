"""Quality benchmark on the embedded toy: the teacher (50 steps, CFG) against rCM, sCM-only, DMD-only and
dCM students at 1, 2 and 4 steps, the same training budget for every method, several seeds.

    python bench/toy_quality.py --out bench_out/toy_quality [--seeds 0 1 2] [--iters 1200]

Reuses the demo's data and teacher if ``--out`` already holds them (each stage resumes). Writes
``quality.json``, ``quality.md`` (mean ± std over seeds) and ``quality.png``; prints the table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rcm.config import load_config
from rcm.data.metrics import toy_metrics
from rcm.data.toy import ToyMixture
from rcm.demo import build_data
from rcm.evaluate import generate_toy_samples, load_network, summarize
from rcm.train import train

METHODS = ("rcm", "scm", "dmd", "dcm")


def train_run(experiment: str, run_dir: Path, data_dir: Path, overrides: list[str]) -> None:
    cfg = load_config([f"experiment={experiment}", f"run_dir={run_dir}", f"data.shards={data_dir}", "train.progress_bar=false", *overrides])
    train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/toy_quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--iters", type=int, default=1200, help="distillation iterations per run (same for all methods)")
    parser.add_argument("--teacher-iters", type=int, default=2000)
    parser.add_argument("--samples-per-class", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    data_dir = build_data(out, 16384)
    teacher_dir = out / "toy_teacher"
    train_run("toy_teacher", teacher_dir, data_dir, [f"train.max_iters={args.teacher_iters}"])
    mixture = ToyMixture.load(data_dir / "ground_truth.pt")

    results: dict[str, list[dict]] = {}
    teacher, teacher_cfg = load_network(teacher_dir)
    guidance = load_config(["experiment=toy_rcm"]).distill.guidance_scale
    for seed in args.seeds:
        samples, ids = generate_toy_samples(teacher, mixture, args.samples_per_class, seed=100 + seed, teacher_steps=50,
                                            guidance_scale=guidance, text_len=teacher_cfg.model.text_len)
        results.setdefault("teacher|50", []).append(summarize(toy_metrics(samples, ids, mixture)))
    for method in args.methods:
        for seed in args.seeds:
            run_dir = out / f"{method}_seed{seed}"
            train_run(f"toy_{method}", run_dir, data_dir, [f"distill.teacher_checkpoint={teacher_dir}", f"train.seed={seed}",
                                                          f"train.max_iters={args.iters}"])
            student, cfg = load_network(run_dir)
            for steps in (1, 2, 4):
                samples, ids = generate_toy_samples(student, mixture, args.samples_per_class, seed=100 + seed,
                                                    student_steps=steps, text_len=cfg.model.text_len)
                results.setdefault(f"{method}|{steps}", []).append(summarize(toy_metrics(samples, ids, mixture)))
            print(f"[quality] {method} seed {seed} done", flush=True)
            table = write_results(results, out)  # after every run, so a long benchmark can be read while it runs
    _plot(results, out / "quality.png")
    print(f"\n{len(args.seeds)} seeds, {args.iters} distillation iterations per run\n" + table)


def write_results(results: dict[str, list[dict]], out: Path) -> str:
    """quality.json and quality.md (mean ± std over seeds); returns the markdown table."""
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    lines = ["| model | steps | seeds | precision ↑ | mode recall ↑ | mode KL ↓ |", "|---|---:|---:|---:|---:|---:|"]
    for key, runs in results.items():
        model, steps = key.split("|")

        def cell(metric: str) -> str:
            values = [r[metric] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        lines.append(f"| {model} | {steps} | {len(runs)} | {cell('precision')} | {cell('recall')} | {cell('mode_kl')} |")
    table = "\n".join(lines)
    (out / "quality.md").write_text(table + "\n")
    return table


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("precision", "recall")):
        for method in METHODS:
            keys = [f"{method}|{s}" for s in (1, 2, 4) if f"{method}|{s}" in results]
            if not keys:
                continue
            means = [statistics.mean(r[metric] for r in results[k]) for k in keys]
            ax.plot([int(k.split("|")[1]) for k in keys], means, marker="o", label=method)
        teacher = statistics.mean(r[metric] for r in results["teacher|50"])
        ax.axhline(teacher, color="black", linestyle="--", label="teacher (50 steps)")
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("student sampling steps")
        ax.set_title(metric)
        ax.set_ylim(0, 1.05)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
