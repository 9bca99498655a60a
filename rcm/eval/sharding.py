"""Splitting work (prompts, shards) over ranks and Slurm array tasks, with seeds and files that do not
depend on how the work was split.

Item i of n goes to work shard i mod S (round-robin). Its randomness comes from `item_seed(seed, i)`, and
its output is written under a temporary name and renamed, so a run killed at any point leaves only
complete files behind and a rerun, with any number of ranks, produces the same files.
"""
from __future__ import annotations

from dataclasses import dataclass

from rcm.parallel.distributed import DistributedInfo

SEED_STRIDE = 1_000_003  # a prime larger than any item count, so (seed, item) pairs never share a seed


@dataclass(frozen=True)
class WorkShard:
    """This process's share of the work: every item i with i mod `count` == `index`."""

    index: int = 0
    count: int = 1

    def items(self, num_items: int) -> range:
        """The item indices of this shard, in order."""
        return range(self.index, num_items, self.count)


def resolve_work_shard(info: DistributedInfo, shard_index: int | None = None, num_shards: int | None = None) -> WorkShard:
    """This process's shard: its rank among the world size, nested inside `--shard-index/--num-shards` when given.

    A Slurm array task (or any independent job) passes its shard index out of the number of tasks; if
    that job itself runs several ranks, each rank takes its part of the task's shard, so any mix of array
    tasks and ranks covers every item exactly once.
    """
    if (shard_index is None) != (num_shards is None):
        raise ValueError("--shard-index and --num-shards go together: give both or neither")
    shard_index, num_shards = (0, 1) if num_shards is None else (shard_index, num_shards)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must lie in [0, --num-shards); got {shard_index} of {num_shards}")
    return WorkShard(index=shard_index * info.world_size + info.rank, count=num_shards * info.world_size)


def item_seed(seed: int, item_index: int) -> int:
    """The seed of one item (a prompt, a shard): depends on the run seed and the item only."""
    return seed * SEED_STRIDE + item_index


