"""Checkpoint utilities: `python -m checkpoints_util <subcommand> --help`.

    inspect PATH          a run's checkpoints, or one checkpoint's tensors (key, shape, dtype, size), step, completeness
    verify PATH           read every shard and check it (CRC-32, sizes, structure); exit status 1 if anything is damaged
    pth-to-dcp SRC DST    a torch.save file (or .safetensors file / shards) → a DCP checkpoint directory
    dcp-to-pth SRC DST    a DCP checkpoint (or a run's latest) → a torch.save file; pick student / EMA / fake score

Conversions stream tensor by tensor (memory stays at a few tensors, whatever the checkpoint size), check
every CRC-32 of the source on the way, and by default write exactly what
`python -m torch.distributed.checkpoint.format_utils` writes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections import defaultdict
from pathlib import Path

from rcm.checkpoint.layout import CheckpointCorruptError, NotACheckpointError
from rcm.checkpoint.manager import COMPLETE_MARKER, CheckpointManager, is_complete, read_marker
from rcm.cli_errors import UserError, debug_enabled, run_cli

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return ""


def _print_tensors(rows: list[tuple[str, tuple, str, int]], summary_only: bool) -> None:
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, shape, dtype, nbytes in rows:
        if not summary_only:
            print(f"{key:72s} {str(shape):22s} {dtype:9s} {_human(nbytes):>10s}")
        group = groups[key.split(".", 1)[0]]
        group[0] += 1
        group[1] += nbytes
    if len(groups) <= 12:
        for name, (count, nbytes) in sorted(groups.items()):
            print(f"  {name:30s} {count:6d} tensors {_human(nbytes):>10s}")
    print(f"total: {len(rows)} tensors, {_human(sum(r[3] for r in rows))}")


def inspect_checkpoint(path: Path, summary_only: bool = False) -> int:
    """Print a run's checkpoints, or one checkpoint's tensors (key, shape, dtype, size) and completeness."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from rcm.checkpoint.verify import read_metadata

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        manager = CheckpointManager(path / "checkpoints")
        for child in sorted((path / "checkpoints").iterdir()):
            if child.is_dir():
                state = "complete" if is_complete(child) else "INCOMPLETE"
                if is_complete(child):
                    try:
                        marker = read_marker(child)
                        state += f"  world size {marker.get('world_size')}, saved in {marker.get('seconds', '?')} s"
                    except CheckpointCorruptError as error:
                        state = f"DAMAGED ({error})"
                print(f"{child.name}  {state}")
        latest = manager.latest()
        print(f"latest complete: {latest.name if latest else 'none'}")
        return 0
    from rcm.checkpoint.weights import SafetensorsState, is_safetensors

    if is_safetensors(path):  # headers only
        tensors = SafetensorsState(path)
        rows = [(name, tensors.shape_of(name), str(tensors.dtype_of(name)).replace("torch.", ""),
                 math.prod(tensors.shape_of(name)) * tensors.dtype_of(name).itemsize) for name in tensors]
        _print_tensors(sorted(rows), summary_only)
        return 0
    if path.is_file():
        from rcm.checkpoint.convert import flatten_tree
        from rcm.checkpoint.weights import describe_object, load_torch_file

        state = load_torch_file(path)
        if not isinstance(state, dict):
            raise NotACheckpointError(f"{path} holds {describe_object(state)}, not a state dict: it is no checkpoint")
        rows = [(".".join(map(str, p)), tuple(t.shape), str(t.dtype).replace("torch.", ""), t.nbytes)
                for p, t in flatten_tree(state) if torch.is_tensor(t)]
        if not rows:
            raise NotACheckpointError(f"{path} holds a dict without any tensor ({len(state)} keys), not a checkpoint")
        _print_tensors(rows, summary_only)
        return 0
    try:
        metadata = read_metadata(path)
    except CheckpointCorruptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows, objects = [], []
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            numel = 1
            for size in item.size:
                numel *= size
            rows.append((key, tuple(item.size), str(item.properties.dtype).replace("torch.", ""), numel * item.properties.dtype.itemsize))
        else:
            objects.append(key)
    _print_tensors(sorted(rows), summary_only)
    if objects:
        print(f"objects: {len(objects)} (e.g. {', '.join(sorted(objects)[:3])})")
    if is_complete(path):
        marker = read_marker(path)
        print(f"step: {marker.get('iteration')}; complete (world size {marker.get('world_size')}, {json.dumps(marker)})")
    elif (path.parent.name == "checkpoints") or path.name.startswith("iter_"):
        print(f"completion: INCOMPLETE (no {COMPLETE_MARKER} marker): the save did not finish")
    return 0


def verify(path: Path, check_crc: bool) -> int:
    """Check every checkpoint of a run, one checkpoint, or a .pth; print each problem with its file."""
    from rcm.checkpoint.verify import verify_checkpoint, verify_torch_file

    if path.is_file():
        targets = [path]
    elif (path / "checkpoints").is_dir():
        targets = [c for c in sorted((path / "checkpoints").iterdir()) if c.is_dir()]
    else:
        targets = [path]
    damaged = 0
    for target in targets:
        if target.is_file():
            problems = verify_torch_file(target, check_crc)
        else:
            problems = verify_checkpoint(target, check_crc)
            if not is_complete(target) and not problems and (target.parent.name == "checkpoints"):
                problems = [f"{target} has no {COMPLETE_MARKER} marker: its save did not finish (resume skips it)"]
        print(f"{target}: {'ok' if not problems else 'DAMAGED'}")
        for problem in problems:
            print(f"  {problem}")
        damaged += bool(problems)
    if damaged:
        print(f"{damaged} of {len(targets)} damaged", file=sys.stderr)
    return 1 if damaged else 0


def _resolve_dcp_source(path: Path) -> Path:
    from rcm.checkpoint.weights import resolve_checkpoint

    return resolve_checkpoint(path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m checkpoints_util", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="list a run's checkpoints, or one checkpoint's tensors",
                                  description="List a run's checkpoints (with completeness), or the tensors of one DCP checkpoint or .pth "
                                              "(key, shape, dtype, size), per-entry totals, the step and the completion marker. Reads metadata only.")
    inspect.add_argument("path", type=Path, help="a run directory, a checkpoint directory (iter_NNNNNNNNN) or a .pth file")
    inspect.add_argument("--summary", action="store_true", help="only the per-entry totals, not every tensor")

    check = commands.add_parser("verify", help="read every shard and check it",
                                description="Read every shard of a checkpoint (or of each checkpoint of a run, or a .pth) and check it: files "
                                            "present and long enough, torch.save containers intact, every CRC-32 matching, as many bytes as the "
                                            "metadata promises, the per-rank files and the marker. Exit status 1 when anything is damaged.")
    check.add_argument("path", type=Path, help="a run directory, a checkpoint directory or a .pth file")
    check.add_argument("--no-crc", action="store_true", help="check structure and sizes only (fast: reads headers, not the tensor bytes)")

    to_dcp = commands.add_parser("pth-to-dcp", help="convert a torch.save (or .safetensors) file into a DCP checkpoint",
                                 description="Convert a torch.save file into a DCP checkpoint directory, tensor by tensor. Without options the "
                                             "result is byte for byte what `format_utils torch_to_dcp` writes. A .safetensors file or a "
                                             "directory of them (the official Wan2.1 DiT, e.g. the 14B's six shards) converts the same way.")
    to_dcp.add_argument("source", type=Path, help="the .pth file (or .safetensors file / directory of shards)")
    to_dcp.add_argument("destination", type=Path, help="the DCP checkpoint directory to create")
    to_dcp.add_argument("--select", help="convert only this sub-dict of the file (e.g. ema, model, state_dict)")
    to_dcp.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast floating-point tensors (default: keep)")
    to_dcp.add_argument("--strip-prefix", metavar="PREFIX", help="remove PREFIX from every key; 'auto' strips module./_orig_mod./net./model.")
    to_dcp.add_argument("--add-prefix", metavar="PREFIX", default="", help="put PREFIX in front of every key")
    to_dcp.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    to_pth = commands.add_parser("dcp-to-pth", help="convert a DCP checkpoint into a torch.save file",
                                 description="Convert a DCP checkpoint (or a run directory's latest complete one) into a torch.save file, "
                                             "tensor by tensor. With --weights all (default) the result is byte for byte what `format_utils "
                                             "dcp_to_torch` writes; with student / ema / fake_score it is that network's plain state dict, "
                                             "loadable with load_state_dict (e.g. as a teacher).")
    to_pth.add_argument("source", type=Path, help="a DCP checkpoint directory or a run directory")
    to_pth.add_argument("destination", type=Path, help="the .pth file to write")
    to_pth.add_argument("--weights", default="all", choices=("all", "student", "model", "ema", "fake_score"),
                        help="everything (all), or one network of a training checkpoint; model = student")
    to_pth.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast floating-point tensors (default: keep)")
    to_pth.add_argument("--strip-prefix", metavar="PREFIX", help="remove PREFIX from every key; 'auto' strips module./_orig_mod./net./model.")
    to_pth.add_argument("--add-prefix", metavar="PREFIX", default="", help="put PREFIX in front of every key (e.g. 'model.')")
    to_pth.add_argument("--workers", type=int, default=2, help="threads reading and writing tensors (default 2)")
    to_pth.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError, UserError) as error:
        if debug_enabled():
            traceback.print_exc()
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """The chosen subcommand; failures on bad input raise (``main`` prints them as one line)."""
    if args.command == "inspect":
        return inspect_checkpoint(args.path, args.summary)
    if args.command == "verify":
        return verify(args.path, check_crc=not args.no_crc)

    from rcm.checkpoint.convert import DTYPES, dcp_to_pth, pth_to_dcp, safetensors_to_dcp
    from rcm.checkpoint.weights import is_safetensors

    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.command == "pth-to-dcp" and is_safetensors(args.source):
        if args.select:
            raise ValueError("--select applies to torch.save files; a safetensors file is flat")
        report = safetensors_to_dcp(args.source, args.destination, dtype=dtype, strip_prefix=args.strip_prefix,
                                    add_prefix=args.add_prefix, overwrite=args.overwrite)
    elif args.command == "pth-to-dcp":
        report = pth_to_dcp(args.source, args.destination, select=args.select, dtype=dtype,
                            strip_prefix=args.strip_prefix, add_prefix=args.add_prefix, overwrite=args.overwrite)
    else:
        weights = "student" if args.weights == "model" else args.weights
        report = dcp_to_pth(_resolve_dcp_source(args.source), args.destination, weights=weights, dtype=dtype,
                            strip_prefix=args.strip_prefix, add_prefix=args.add_prefix, overwrite=args.overwrite,
                            workers=args.workers)
    print(f"{args.source} -> {args.destination}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "checkpoints_util"))
