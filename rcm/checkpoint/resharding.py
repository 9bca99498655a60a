"""Per-rank training state when a checkpoint is loaded on another world size.

DCP reshards the tensors exactly. The per-rank state cannot be mapped one to one, so it is re-derived:

- counters (iteration, student iteration) are global and carry over;
- the data position keeps the *fraction of the epoch* already consumed: the old ranks' positions give the
  number of samples the whole job consumed in the earliest epoch any rank was in, and each new rank
  skips that fraction of its own (new) shard list. Samples near the boundary may repeat or be skipped,
  but no rank restarts the epoch and none runs past it;
- the random streams are re-seeded from (seed, iteration, rank), so the continued run is deterministic
  for the new world size, though not bit-identical to the uninterrupted one.
"""
from __future__ import annotations

import copy
import hashlib
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from rcm.data.shards import LATENT_MEMBER, ShardLoader


@lru_cache(maxsize=None)
def samples_in_shard(path: Path) -> int:
    """Number of samples in a webdataset shard, from its tar headers alone (member data is skipped)."""
    with tarfile.open(path, "r:") as archive:
        return sum(1 for member in archive if member.name.endswith("." + LATENT_MEMBER))


def _shards_of(loader: ShardLoader, rank: int, world_size: int, epoch: int) -> list[Path]:
    view = copy.copy(loader)  # the loader's own shard split, evaluated for another (rank, world size)
    view.rank, view.world_size = rank, world_size
    return view.shards_for_epoch(epoch)


def rederive_loader_position(loader: ShardLoader, saved_positions: list[dict[str, int]]) -> tuple[dict[str, int], float]:
    """This rank's loader position from the positions every old rank saved; returns (position, epoch fraction)."""
    old_world_size = len(saved_positions)
    epoch = min(int(position["epoch"]) for position in saved_positions)
    consumed = 0
    for rank, position in enumerate(saved_positions):
        if int(position["epoch"]) == epoch:
            consumed += int(position["samples_in_epoch"])
        else:  # this old rank already finished the epoch: all of its shards were consumed
            consumed += sum(samples_in_shard(p) for p in _shards_of(loader, rank, old_world_size, epoch))
    total = sum(samples_in_shard(p) for p in loader.shards)
    fraction = min(1.0, consumed / total) if total else 0.0
    mine = sum(samples_in_shard(p) for p in _shards_of(loader, loader.rank, loader.world_size, epoch))
    skip = round(fraction * mine)
    if skip >= mine:
        return {"epoch": epoch + 1, "samples_in_epoch": 0}, fraction
    return {"epoch": epoch, "samples_in_epoch": skip}, fraction


def reseeded(seed: int, iteration: int, rank: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one rank after resharding."""
    digest = hashlib.sha256(f"reshard:{seed}:{iteration}:{rank}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_state_for_new_world(
    saved: list[dict[str, Any]], loader: ShardLoader, seed: int, iteration: int, rank: int, generator_device: torch.device
) -> tuple[dict[str, Any], str]:
    """A rank state (the format of ``Trainer.rank_state``) for ``rank`` of the new world; returns (state, explanation)."""
    position, fraction = rederive_loader_position(loader, [state["loader"] for state in saved])
    generator = torch.Generator(generator_device).manual_seed(reseeded(seed, iteration, rank, "noise"))
    torch_rng = torch.Generator().manual_seed(reseeded(seed, iteration, rank, "torch"))
    state = {
        **saved[0],
        "loader": position,
        "generator": generator.get_state(),
        "torch_rng": torch_rng.get_state(),
    }
    epoch = min(int(state["loader"]["epoch"]) for state in saved)
    explanation = (
        f"saved by {len(saved)} ranks, loaded by {loader.world_size}: tensors are resharded exactly; the data position "
        f"is re-derived ({fraction:.1%} of epoch {epoch} consumed; samples near that point may repeat or be skipped) "
        "and the random streams are re-seeded from (seed, iteration, rank): the run continues deterministically, "
        "but not bit-identically to an uninterrupted one"
    )
    return state, explanation
