"""What a checkpoint directory looks like on disk, and the errors about it: the names and small helpers that the
manager (writing, finding) and the verifier (checking) both need, so that neither imports the other."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rcm.cli_errors import UserError

COMPLETE_MARKER = "COMPLETE"
METADATA_FILE = ".metadata"
CHECKPOINT_NAME = re.compile(r"^iter_(\d{9})$")


class CheckpointCorruptError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated or damaged; the message names the file."""


class NotACheckpointError(UserError, ValueError):
    """A file given as a checkpoint is not one (a text file, a list, a tensor); the message names the file."""


class CheckpointSaveError(UserError, OSError):
    """A save could not be written (e.g. the disk is full); the message names the checkpoint directory."""


def is_complete(path: Path) -> bool:
    """A checkpoint counts only once its completion marker exists."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def rank_file(path: Path, rank: int) -> Path:
    """The per-rank state file of ``rank`` inside a checkpoint directory."""
    return Path(path) / f"rank_{rank:05d}.pt"


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker's contents: iteration, world_size, saved_at, seconds, async."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        content = json.loads(marker.read_text())
        world_size, iteration = content["world_size"], content["iteration"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointCorruptError(f"{marker} is unreadable ({type(error).__name__}: {error})") from error
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(iteration, int) and iteration >= 0):
        raise CheckpointCorruptError(f"{marker} is damaged: world_size {world_size!r} and iteration {iteration!r} "
                                     "must be a positive and a non-negative integer")
    named = CHECKPOINT_NAME.match(Path(path).name)
    if named and int(named.group(1)) != iteration:
        raise CheckpointCorruptError(f"{marker} is damaged: it records iteration {iteration}, its directory "
                                     f"{Path(path).name} another")
    return content
