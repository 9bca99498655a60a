"""Checkpoint utilities: `python -m checkpoints_util <subcommand> --help`.

    inspect PATH    list the checkpoints of a run directory, or the tensors of one checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rcm.checkpoint.manager import COMPLETE_MARKER, CheckpointManager, is_complete


def inspect_checkpoint(path: Path) -> int:
    """Print a run's checkpoints, or one checkpoint's tensors (key, shape, dtype) and completeness."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if (path / "checkpoints").is_dir():
        manager = CheckpointManager(path / "checkpoints")
        for child in sorted((path / "checkpoints").iterdir()):
            print(f"{child.name}  {'complete' if is_complete(child) else 'INCOMPLETE'}")
        latest = manager.latest()
        print(f"latest complete: {latest.name if latest else 'none'}")
        return 0
    if not (path / ".metadata").is_file():
        print(f"error: {path} is neither a run directory nor a DCP checkpoint (no .metadata file)", file=sys.stderr)
        return 2
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    total = 0
    for key, item in sorted(metadata.state_dict_metadata.items()):
        if isinstance(item, TensorStorageMetadata):
            numel = 1
            for size in item.size:
                numel *= size
            total += numel * item.properties.dtype.itemsize
            print(f"{key:70s} {str(tuple(item.size)):22s} {str(item.properties.dtype).replace('torch.', '')}")
        else:
            print(f"{key:70s} (object)")
    marker = path / COMPLETE_MARKER
    status = json.loads(marker.read_text()) if marker.is_file() else "INCOMPLETE (no marker)"
    print(f"tensors: {total / 2**20:.1f} MiB; completion: {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m checkpoints_util", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="list checkpoints of a run, or the tensors of one checkpoint")
    inspect.add_argument("path", type=Path, help="a run directory or a checkpoint directory (iter_NNNNNNNNN)")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return inspect_checkpoint(args.path)
    return 1


if __name__ == "__main__":
    sys.exit(main())
