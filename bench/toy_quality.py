"""Quality benchmark on the embedded toy: the teacher (50 steps, CFG) against rCM, sCM-only, DMD-only and
dCM students (and recipe or study variants) at 1, 2 and 4 steps, the same training budget for every run,
several seeds, runs in parallel processes.

    python bench/toy_quality.py --out bench_out/toy_quality [--seeds 0 1 2] [--iters 1200] [--workers 4]
    python bench/toy_quality.py --variants rcm rcm_14b_recipe rcm_sim1 --seeds 0 1   # recipe / study variants
    python bench/toy_quality.py --list                                               # what each variant changes

Reuses the data and teacher if ``--out`` already holds them (each stage resumes). Every student is sampled
with the paper's mid-times (1.5, 1.4, 1.0) and with the toy's (1.2, 0.8, 0.5), at σ_max 80 and, for one step,
also at 200 and 1600; its 1-step samples also give the distances to the nearest mode of their prompt in units
of the mode radius (mode_std·√D; a true sample sits near 1). Writes ``quality.json``, ``quality.md`` (mean ±
std over seeds) and ``quality.png``; prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

METHODS = ("rcm", "scm", "dmd", "dcm")
PAPER_MIDS, TOY_MIDS = (1.5, 1.4, 1.0), (1.2, 0.8, 0.5)
ONE_STEP_SIGMA_MAX = (80.0, 200.0, 1600.0)
# name -> (experiment, overrides, what it changes)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    **{m: (f"toy_{m}", [], f"the toy {m} recipe") for m in METHODS},
    "rcm_14b_recipe": ("toy_rcm", ["distill.student_update_freq=10", "distill.tangent_warmup=0",
                                   "distill.scm_time.p_mean=1.5", "distill.scm_time.p_std=1.6"],
                       "the 14B schedule: 1-in-10 student steps, no warmup, p_G = LogNormal(1.5, 1.6)"),
    "rcm_dmd_x4": ("toy_rcm", ["distill.loss_scale_dmd=4.0"], "DMD weight 4 (recipe: 1)"),
    "rcm_sim1": ("toy_rcm", ["distill.max_simulation_steps=1"], "DMD generator always 1 step (recipe: cycles 1-4)"),
    "rcm_freq2": ("toy_rcm", ["distill.student_update_freq=2"], "1-in-2 student steps (recipe: 1-in-5)"),
    "rcm_pG_high": ("toy_rcm", ["distill.scm_time.p_mean=1.5"], "p_G = LogNormal(1.5, 1.6) alone"),
    "rcm_fixed_times": ("toy_rcm", ["distill.dmd_fix_timesteps=true"], "DMD generator on the fixed times 1.5/1.4/1.0"),
    "rcm_sim1_dmd_x4": ("toy_rcm", ["distill.max_simulation_steps=1", "distill.loss_scale_dmd=4.0"],
                        "1-step DMD generator and DMD weight 4"),
    "rcm_long_cosine": ("toy_rcm", ["optim.decay=cosine", "+iters_factor=3"], "3x the iterations, cosine decay to 0"),
    "dmd_sim1": ("toy_dmd", ["distill.max_simulation_steps=1"], "DMD-only with a 1-step generator"),
}


def train_run(experiment: str, run_dir: Path, data_dir: Path, overrides: list[str], threads: int | None = None) -> None:
    """Train one experiment into ``run_dir`` on the CPU (resuming if it already has checkpoints)."""
    import torch

    from rcm.config import load_config
    from rcm.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config([f"experiment={experiment}", f"run_dir={run_dir}", f"data.shards={data_dir}",
                       "train.progress_bar=false", "train.device=cpu", *overrides])
    train(cfg)


def nearest_mode_distance_percentiles(samples, ids, mixture) -> dict[str, float]:
    """10th, 50th and 90th percentiles of each sample's distance to the nearest mode of its own prompt, in
    units of the mode radius mode_std·√D."""
    import torch

    flat = samples.double().flatten(1)
    means = mixture.means.double().flatten(2)[ids]  # (N, M, D)
    nearest = (flat[:, None, :] - means).norm(dim=2).min(dim=1).values
    radius = mixture.precision_radius / mixture.radius_factor
    q = torch.quantile(nearest / radius, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"distance_p10": float(q[0]), "distance_p50": float(q[1]), "distance_p90": float(q[2])}


def evaluate_student(run_dir: Path, mixture, samples_per_class: int, seed: int) -> dict[str, dict]:
    """Metrics of a trained student at 1, 2 and 4 steps, paper and toy mid-times, and 1-step σ_max sweep."""
    from rcm.data.metrics import toy_metrics
    from rcm.evaluate import generate_toy_samples, load_network, summarize

    student, cfg = load_network(run_dir)
    results = {}
    for mids_name, mids in (("paper", PAPER_MIDS), ("toy", TOY_MIDS)):
        for steps in (1, 2, 4):
            sigmas = ONE_STEP_SIGMA_MAX if steps == 1 else (ONE_STEP_SIGMA_MAX[0],)
            for sigma_max in sigmas:
                if steps == 1 and mids_name == "toy":
                    continue  # one step has no mid-time
                samples, ids = generate_toy_samples(student, mixture, samples_per_class, seed=100 + seed,
                                                    student_steps=steps, text_len=cfg.model.text_len, mid_times=mids,
                                                    sigma_max=sigma_max)
                row = summarize(toy_metrics(samples, ids, mixture))
                if steps == 1:
                    row.update(nearest_mode_distance_percentiles(samples, ids, mixture))
                results[f"{steps}|{mids_name if steps > 1 else '-'}|{sigma_max:g}"] = row
    return results


def run_variant(variant: str, seed: int, out: Path, data_dir: Path, teacher_dir: Path, iters: int,
                samples_per_class: int, threads: int, model_overrides: list[str] = ()) -> tuple[str, int, dict, float]:
    """Train one (variant, seed) student and evaluate it; runs in a worker process."""
    from rcm.data.toy import ToyMixture

    started = time.time()
    experiment, overrides, _ = VARIANTS[variant]
    factor = 1
    kept = []
    for override in overrides:
        if override.startswith("+iters_factor="):
            factor = int(override.split("=", 1)[1])
        else:
            kept.append(override)
    run_dir = out / f"{variant}_seed{seed}"
    train_run(experiment, run_dir, data_dir, [f"distill.teacher_checkpoint={teacher_dir}", f"train.seed={seed}",
                                               f"train.max_iters={iters * factor}", *kept, *model_overrides], threads)
    mixture = ToyMixture.load(data_dir / "ground_truth.pt")
    return variant, seed, evaluate_student(run_dir, mixture, samples_per_class, seed), time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/toy_quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="shorthand for --variants with method names")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="default: the four methods")
    parser.add_argument("--study-variants", nargs="+", choices=sorted(VARIANTS), default=[],
                        help="more variants, trained with --study-seeds (after the main ones)")
    parser.add_argument("--study-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iters", type=int, default=1200, help="distillation iterations per run (same for all)")
    parser.add_argument("--teacher-iters", type=int, default=2000)
    parser.add_argument("--samples-per-class", type=int, default=256)
    parser.add_argument("--model-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="model.* overrides for the teacher and every student (a capacity study), e.g. "
                             "model.dim=128 model.ffn_dim=256 model.num_layers=4")
    parser.add_argument("--workers", type=int, default=1, help="runs trained in parallel (one CPU thread each "
                        "when several)")
    parser.add_argument("--list", action="store_true", help="print the variants and what each changes, then exit")
    args = parser.parse_args()
    if args.list:
        for name, (experiment, overrides, what) in VARIANTS.items():
            print(f"{name:18s} {what}  [{experiment} {' '.join(overrides)}]")
        return
    variants = args.variants or args.methods or list(METHODS)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if any(not o.startswith("model.") or "=" not in o for o in args.model_overrides):
        parser.error(f"--model-overrides takes model.KEY=VALUE items, got {args.model_overrides}")

    from rcm.data.metrics import toy_metrics
    from rcm.data.toy import ToyMixture
    from rcm.demo import build_data
    from rcm.config import load_config
    from rcm.evaluate import generate_toy_samples, load_network, summarize

    out = Path(args.out).resolve()
    started = time.time()
    data_dir = build_data(out, 16384)
    teacher_dir = out / "toy_teacher"
    # A few threads: the toy is too small for more (16 threads took 447 s for what 2 do in ~150 s).
    train_run("toy_teacher", teacher_dir, data_dir, [f"train.max_iters={args.teacher_iters}", *args.model_overrides],
              threads=2)
    print(f"[quality] teacher ready ({time.time() - started:.0f} s)", flush=True)
    mixture = ToyMixture.load(data_dir / "ground_truth.pt")

    results: dict[str, list[dict]] = {}
    teacher, teacher_cfg = load_network(teacher_dir)
    guidance = load_config(["experiment=toy_rcm"]).distill.guidance_scale
    for seed in args.seeds:
        samples, ids = generate_toy_samples(teacher, mixture, args.samples_per_class, seed=100 + seed, teacher_steps=50,
                                            guidance_scale=guidance, text_len=teacher_cfg.model.text_len)
        row = summarize(toy_metrics(samples, ids, mixture))
        row.update(nearest_mode_distance_percentiles(samples, ids, mixture))
        results.setdefault("teacher|50|-|-", []).append(row)

    jobs = [(variant, seed) for variant in variants for seed in args.seeds]
    jobs += [(variant, seed) for variant in args.study_variants for seed in args.study_seeds]
    threads = 1 if args.workers > 1 else None
    if args.workers > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, variant, seed, out, data_dir, teacher_dir, args.iters,
                               args.samples_per_class, threads, args.model_overrides) for variant, seed in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            variant, seed, rows, seconds = future.result()
            for key, row in rows.items():
                results.setdefault(f"{variant}|{key}", []).append(row)
            print(f"[quality] {variant} seed {seed} done in {seconds:.0f} s ({done}/{len(jobs)})", flush=True)
            table = write_results(results, out)  # after every run, so a long benchmark can be read while it runs
    _plot(results, out / "quality.png", variants + args.study_variants)
    print(f"\n{len(args.seeds)} seeds, {args.iters} distillation iterations per run, {time.time() - started:.0f} s\n"
          + table)


def write_results(results: dict[str, list[dict]], out: Path) -> str:
    """quality.json and quality.md (mean ± std over seeds); returns the markdown table."""
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    lines = ["| model | steps | mid-times | σ_max | seeds | precision ↑ | mode recall ↑ | mode KL ↓ | sliced W2 ↓ "
             "| nearest-mode distance p10 / p50 / p90 |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, runs in results.items():
        model, steps, mids, sigma_max = key.split("|")

        def cell(metric: str) -> str:
            values = [r[metric] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        distances = (" / ".join(f"{statistics.mean(r[f'distance_p{q}'] for r in runs):.2f}" for q in (10, 50, 90))
                     if "distance_p10" in runs[0] else "")
        lines.append(f"| {model} | {steps} | {mids} | {sigma_max} | {len(runs)} | {cell('precision')} | "
                     f"{cell('recall')} | {cell('mode_kl')} | {cell('sliced_wasserstein')} | {distances} |")
    table = "\n".join(lines)
    (out / "quality.md").write_text(table + "\n")
    return table


def _plot(results: dict[str, list[dict]], path: Path, variants: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("precision", "recall")):
        for variant in variants:
            keys = [k for s in (1, 2, 4) for k in (f"{variant}|{s}|-|80", f"{variant}|{s}|paper|80") if k in results]
            if not keys:
                continue
            means = [statistics.mean(r[metric] for r in results[k]) for k in keys]
            ax.plot([int(k.split("|")[1]) for k in keys], means, marker="o", label=variant)
        teacher = statistics.mean(r[metric] for r in results["teacher|50|-|-"])
        ax.axhline(teacher, color="black", linestyle="--", label="teacher (50 steps)")
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("student sampling steps (paper mid-times)")
        ax.set_title(metric)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
