"""Checkpoint conversion throughput: `python -m checkpoints_util` against `python -m torch.distributed.checkpoint.format_utils`.

    python bench/checkpoint_conversion.py                          # Wan2.1 1.3B in bf16 (2.84 GB), 5 rounds, in /tmp
    python bench/checkpoint_conversion.py --workdir /dev/shm/x     # memory-backed: the tools' own cost, no disk

A random checkpoint with the official Wan2.1 keys and shapes is written once; then each round converts it
.pth → DCP and DCP → .pth with both tools, alternating which goes first. Each conversion is its own process
(interpreter start included, as a user runs it), timed after a `sync` so that earlier writes do not slow it:
"command" is the time until the process exits, "durable" adds a `sync` (format_utils' torch_to_dcp and our
pth-to-dcp fsync their output themselves; neither dcp_to_torch nor our dcp-to-pth does). Peak RSS is the
process's maximum resident set. The outputs of both tools are compared (SHA-256); at most three checkpoint
copies exist at a time (source, format_utils' DCP, one output).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_random_checkpoint(path: Path, model: str) -> int:
    """A bf16 state dict with the keys and shapes of ``configs/model/<model>.yaml``; returns its tensor bytes."""
    import torch
    import yaml

    from rcm.models.wan_dit import WanDiT, WanDiTConfig

    with torch.device("meta"):
        network = WanDiT(WanDiTConfig(**yaml.safe_load((REPO / "configs/model" / f"{model}.yaml").read_text())))
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.empty(v.shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=generator)
             for k, v in network.state_dict().items()}
    torch.save(state, path)
    return sum(t.nbytes for t in state.values())


def digest(path: Path) -> str:
    """SHA-256 of a file, or of a DCP directory's data and metadata files in name order."""
    files = sorted(p for p in path.iterdir() if p.name != ".metadata") if path.is_dir() else [path]
    sha = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                sha.update(chunk)
    return sha.hexdigest()


def timed(command: list[str]) -> dict[str, float]:
    """Run a command after a sync; wall time to exit, to exit plus sync, and peak RSS."""
    os.sync()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    command_s = time.perf_counter() - started
    os.sync()
    durable_s = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return {"command_s": command_s, "durable_s": durable_s, "peak_rss_gib": usage.ru_maxrss / 2**20}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0")
    return {"cpu": f"{cpu}, {os.cpu_count()} cores", "memory": f"{int(memory) / 2**20:.0f} GiB",
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def main() -> None:
    """Benchmark both tools in both directions and print a markdown table plus JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rcm_checkpoint_conversion_bench"))
    parser.add_argument("--model", default="wan2.1-t2v-1.3B", help="a configs/model preset (the 14B one is 28 GB)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        print(write_random_checkpoint(args.write_checkpoint, args.model))
        return

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source = work / "model.pth"
    python = sys.executable
    # In a child process: a forked child inherits this process's peak RSS, so this one must stay small.
    nbytes = int(subprocess.run([python, __file__, "--write-checkpoint", str(source), "--model", args.model], cwd=REPO,
                                check=True, capture_output=True, text=True).stdout.split()[-1])
    tools = {
        "format_utils": {"to_dcp": [python, "-m", "torch.distributed.checkpoint.format_utils", "torch_to_dcp"],
                         "to_pth": [python, "-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch"]},
        "checkpoints_util": {"to_dcp": [python, "-m", "checkpoints_util", "pth-to-dcp"],
                             "to_pth": [python, "-m", "checkpoints_util", "dcp-to-pth"]},
    }
    results: dict[str, dict[str, list[dict]]] = {tool: {"to_dcp": [], "to_pth": []} for tool in tools}
    digests: dict[str, set[str]] = {"dcp": set(), "pth": set()}
    reference_dcp = work / "reference.dcp"  # format_utils' output: the source of every DCP → .pth run
    for round_index in range(args.rounds):
        order = list(tools) if round_index % 2 == 0 else list(reversed(tools))
        for tool in order:
            output = work / f"{tool}.dcp"
            remove(output)
            results[tool]["to_dcp"].append(timed([*tools[tool]["to_dcp"], str(source), str(output)]))
            digests["dcp"].add(digest(output))
            if tool == "format_utils":
                remove(reference_dcp)
                output.rename(reference_dcp)
            else:
                remove(output)
        for tool in order:
            output = work / tool / "model.pth"  # same base name for both: it is the archive name inside the file
            output.parent.mkdir(exist_ok=True)
            results[tool]["to_pth"].append(timed([*tools[tool]["to_pth"], str(reference_dcp), str(output)]))
            digests["pth"].add(digest(output))
            remove(output)
        print(f"round {round_index + 1}: " + ", ".join(f"{t} {d} {results[t][d][-1]['command_s']:.1f} s"
                                                     for t in tools for d in ("to_dcp", "to_pth")), flush=True)
    identical = {kind: len(found) == 1 for kind, found in digests.items()}

    gigabytes = nbytes / 1e9
    summary = {"checkpoint": f"{args.model}, bf16, {gigabytes:.2f} GB ({nbytes / 2**30:.2f} GiB)", "rounds": args.rounds,
               "machine": machine(), "identical_outputs": identical, "results": {}}
    lines = ["| direction | tool | command s (median) | GB/s | durable s (median) | GB/s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for direction, label in (("to_dcp", ".pth → DCP"), ("to_pth", "DCP → .pth")):
        medians = {}
        for tool in tools:
            runs = results[tool][direction]
            command = statistics.median(r["command_s"] for r in runs)
            durable = statistics.median(r["durable_s"] for r in runs)
            rss = max(r["peak_rss_gib"] for r in runs)
            medians[tool] = (command, durable)
            summary["results"].setdefault(direction, {})[tool] = {"runs": runs, "median_command_s": command, "median_durable_s": durable}
            lines.append(f"| {label} | {tool} | {command:.1f} | {gigabytes / command:.2f} | {durable:.1f} | {gigabytes / durable:.2f} | {rss:.2f} |")
        speedup_command = medians["format_utils"][0] / medians["checkpoints_util"][0]
        speedup_durable = medians["format_utils"][1] / medians["checkpoints_util"][1]
        summary["results"][direction]["speedup"] = {"command": speedup_command, "durable": speedup_durable}
        lines.append(f"| {label} | **speed-up** | **{speedup_command:.2f}×** | | **{speedup_durable:.2f}×** | | |")
    print("\n".join(lines))
    print(json.dumps(summary, indent=1))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
