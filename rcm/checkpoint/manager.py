"""One checkpoint manager: DCP saves of the whole training state, an atomic completion marker, keep-last-k,
and "latest complete checkpoint" lookup for automatic resume.

Layout of a run directory::

    checkpoints/iter_000001000/   DCP shards + .metadata (models, EMA, optimizers)
                               rank_00000.pt ...   per-rank state (RNG, data position, counters)
                               COMPLETE            written last, by rank 0, after every rank finished
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from rcm.parallel.distributed import DistributedInfo, barrier

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load; single-process is a supported mode here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT_NAME = re.compile(r"^iter_(\d{9})$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    """A checkpoint counts only once its completion marker exists."""
    return (Path(path) / COMPLETE_MARKER).is_file()


class CheckpointManager:
    """Saves and finds checkpoints under ``<run_dir>/checkpoints``."""

    def __init__(self, directory: str | Path, info: DistributedInfo = DistributedInfo(), keep_last: int = 3):
        self.directory = Path(directory)
        self.info = info
        self.keep_last = keep_last

    def path_for(self, iteration: int) -> Path:
        """Directory of the checkpoint taken after ``iteration`` iterations."""
        return self.directory / f"iter_{iteration:09d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(iteration, path) of every complete checkpoint, oldest first; incomplete ones are skipped with a warning."""
        found = []
        if not self.directory.is_dir():
            return found
        for child in sorted(self.directory.iterdir()):
            match = _CHECKPOINT_NAME.match(child.name)
            if not match or not child.is_dir():
                continue
            if is_complete(child):
                found.append((int(match.group(1)), child))
            else:
                log.warning("skipping incomplete checkpoint %s (no %s marker: the save did not finish)", child, COMPLETE_MARKER)
        return found

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def save(self, iteration: int, state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective save: DCP for ``state``, one file per rank for ``rank_state``, then the marker."""
        path = self.path_for(iteration)
        if is_complete(path):
            return path
        if self.info.is_main and path.exists():
            shutil.rmtree(path)  # leftovers of a save that crashed
        barrier(self.info)
        started = time.time()
        dcp.save(state, checkpoint_id=str(path))
        atomic_write_bytes(path / f"rank_{self.info.rank:05d}.pt", _to_bytes(rank_state))
        barrier(self.info)
        if self.info.is_main:
            marker = {"iteration": iteration, "world_size": self.info.world_size, "saved_at": time.time()}
            atomic_write_bytes(path / COMPLETE_MARKER, json.dumps(marker).encode())
            self._prune()
            log.info("saved checkpoint %s in %.1f s", path, time.time() - started)
        barrier(self.info)
        return path

    def load(self, path: str | Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """Fill ``state`` in place from a checkpoint; returns this rank's saved rank state (None if absent)."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"checkpoint {path} is not complete (no {COMPLETE_MARKER} marker); refusing to load it")
        dcp.load(state, checkpoint_id=str(path))
        rank_file = path / f"rank_{self.info.rank:05d}.pt"
        if not rank_file.is_file():
            log.warning("%s has no state for rank %d (saved with another world size); RNG and data position restart", path, self.info.rank)
            return None
        return torch.load(rank_file, weights_only=False)

    def _prune(self) -> None:
        checkpoints = self.complete_checkpoints()
        for _, old in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            # Remove the marker first: a crash mid-delete must not leave a "complete" half checkpoint.
            (old / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


def iteration_of(path: str | Path) -> int:
    """The iteration a checkpoint directory was taken at."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like iter_000001000)")
    return int(match.group(1))


def _to_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
