"""Files that readers never see half-written: write a temporary file beside the target, then rename it over.

The lowest layer of the package (torch only), so data, checkpointing, evaluation and launch code share it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file (flushed to disk) and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(value: object, path: Path) -> None:
    """torch.save to `path` through a hidden temporary file renamed at the end, so `path` is never partial."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        torch.save(value, temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


__all__ = ["atomic_torch_save", "atomic_write_bytes"]
