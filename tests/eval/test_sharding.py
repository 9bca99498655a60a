"""Work sharding: every item is done exactly once for any mix of ranks and array tasks, seeds depend only on
the item, and an interrupted save leaves no file under the final name."""
import pytest
import torch

from rcm.atomic_files import atomic_torch_save
from rcm.eval.sharding import WorkShard, item_seed, resolve_work_shard
from rcm.parallel.distributed import DistributedInfo


@pytest.mark.parametrize("num_tasks,world_size", [(1, 1), (1, 3), (4, 1), (3, 2)])
def test_tasks_and_ranks_cover_every_item_once(num_tasks, world_size):
    """Array tasks × ranks partition the items: each of 23 items lands in exactly one process's shard."""
    seen = []
    for task in range(num_tasks):
        for rank in range(world_size):
            info = DistributedInfo(rank=rank, world_size=world_size)
            shard = resolve_work_shard(info, task if num_tasks > 1 else None, num_tasks if num_tasks > 1 else None)
            seen += list(shard.items(23))
    assert sorted(seen) == list(range(23))


def test_round_robin_assignment():
    """Item i goes to shard i mod count."""
    assert list(WorkShard(index=1, count=3).items(8)) == [1, 4, 7]


def test_shard_options_are_checked():
    """--shard-index without --num-shards, or out of range, is refused with the option names."""
    with pytest.raises(ValueError, match="--num-shards"):
        resolve_work_shard(DistributedInfo(), 0, None)
    with pytest.raises(ValueError, match=r"\[0, --num-shards\)"):
        resolve_work_shard(DistributedInfo(), 2, 2)


def test_item_seed_depends_on_seed_and_item_only():
    """Distinct (seed, item) pairs give distinct seeds, and the formula matches the legacy evaluation's."""
    seeds = {item_seed(seed, item) for seed in range(5) for item in range(1000)}
    assert len(seeds) == 5000
    assert item_seed(1, 7) == 1 * 1_000_003 + 7


def test_failed_save_leaves_no_file(tmp_path):
    """A torch.save that fails midway leaves neither the final file nor its temporary."""
    path = tmp_path / "prompt_00000.pt"
    with pytest.raises(Exception):
        atomic_torch_save({"samples": torch.zeros(2), "bad": lambda: None}, path)
    assert list(tmp_path.iterdir()) == []
    atomic_torch_save({"samples": torch.ones(2)}, path)
    assert torch.equal(torch.load(path)["samples"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == [path.name]
