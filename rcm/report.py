"""A run's curves and summary from its ``metrics.jsonl``, for a look without TensorBoard or W&B:

    python -m rcm.report runs/toy_rcm                  # runs/toy_rcm/report/curves.png and summary.md
    python -m rcm.report runs/toy_rcm --out figures/

One panel per metric group (the part of the key before the first ``/``: losses, gradient norms, step times,
throughput, memory, GPU telemetry, stragglers, and any other group a run logs), over iterations.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from numbers import Real
from pathlib import Path

from rcm.cli_errors import UserError, run_cli

METRICS_FILE = "metrics.jsonl"
# Groups shown first, in this order; the others follow alphabetically.
GROUP_ORDER = ("loss", "grad_norm", "time", "throughput", "memory", "gpu", "stragglers", "lr")
# Keys whose numbers are codes, counters or a device's constants, not curves.
NOT_CURVES = ("gpu/throttle_reasons", "gpu/ecc_corrected", "gpu/ecc_uncorrected", "gpu/retired_pages_pending",
              "gpu/memory_total_gib", "gpu/sm_clock_max_mhz", "gpu/power_limit_w")
# Groups whose keys have different units: one panel per key.
SPLIT_GROUPS = ("gpu", "throughput")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in iteration order, each iteration once (the last record of it wins);
    a line cut short by a crash is skipped."""
    by_iteration: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            by_iteration[int(record["iteration"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return [by_iteration[iteration] for iteration in sorted(by_iteration)]


def curve_groups(records: list[dict]) -> dict[str, list[str]]:
    """{panel title: its keys} of every numeric key that some record holds: one panel per group (a key of
    ``SPLIT_GROUPS`` or alone in its group has its own, titled with the key), in display order."""
    keys: dict[str, set[str]] = defaultdict(set)
    for record in records:
        for key, value in record.items():
            if key != "iteration" and key not in NOT_CURVES and isinstance(value, Real) and not isinstance(value, bool):
                keys[key.split("/", 1)[0] if "/" in key else key].add(key)
    order = [g for g in GROUP_ORDER if g in keys] + sorted(g for g in keys if g not in GROUP_ORDER)
    panels = {}
    for group in order:
        if group in SPLIT_GROUPS or len(keys[group]) == 1:
            panels.update({key: [key] for key in sorted(keys[group])})
        else:
            panels[group] = sorted(keys[group])
    return panels


def plot_curves(records: list[dict], path: str | Path, columns: int = 3) -> Path:
    """One panel per entry of ``curve_groups``, values over iterations (a log axis where they span 100× or
    more); written as PNG to ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("rcm.report needs matplotlib to draw curves.png (pip install matplotlib, or the "
                        "project's [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = curve_groups(records)
    rows = max(1, math.ceil(len(groups) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, groups.items()):
        values = []
        for key in keys:
            points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), Real) and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), label=key.removeprefix(f"{title}/"), linewidth=1)
                values += [value for _, value in points]
        if values and min(values) > 0 and max(values) >= 100 * min(values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summary_markdown(records: list[dict], run_dir: str | Path) -> str:
    """A markdown summary: the iterations logged, each group's last values and the mean speed of the last
    quarter of the run."""
    first, last = records[0], records[-1]
    lines = [f"# Run {run_dir}", "", f"Iterations {first['iteration']} to {last['iteration']} "
             f"({len(records)} logged).", ""]
    tail = records[-max(1, len(records) // 4):]
    for key in ("time/step_s", "throughput/samples_per_s", "throughput/tokens_per_s", "throughput/mfu"):
        values = [r[key] for r in tail if isinstance(r.get(key), Real)]
        if values:
            lines.append(f"- mean {key} over the last {len(values)} logged iterations: {sum(values) / len(values):.4g}")
    if "skipped_updates" in last:
        lines.append(f"- skipped (non-finite) updates: {last['skipped_updates']:.0f}")
    lines += ["", "| metric | last value |", "| --- | --- |"]
    for keys in curve_groups(records).values():
        for key in keys:
            value = next((r[key] for r in reversed(records) if isinstance(r.get(key), Real)), None)
            if value is not None:
                lines.append(f"| {key} | {value:.4g} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """curves.png and summary.md of the run in ``run_dir`` in ``out`` (default ``<run_dir>/report``); returns
    ``out``."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{run_dir} holds no {METRICS_FILE}: give the run_dir of a run that has logged "
                        "(train.log_every iterations at least)")
    records = read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics} holds no complete record yet")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(records, out / "curves.png")
    (out / "summary.md").write_text(summary_markdown(records, run_dir))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m rcm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's directory (it holds metrics.jsonl)")
    parser.add_argument("--out", help="where curves.png and summary.md go (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    out = write_report(args.run_dir, args.out)
    print(f"wrote {out / 'curves.png'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "rcm.report"))
