"""Loading on another world size: a 4-rank training checkpoint resumed by 2 ranks (gloo, CPU), sharded DTensors
resharded 4 → 2, and the per-rank data position re-derived so that the epoch fraction carries over."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from rcm.checkpoint.manager import CheckpointManager
from rcm.checkpoint.resharding import rederive_loader_position, reseeded, samples_in_shard
from rcm.checkpoint.weights import load_model_weights
from rcm.config import load_config
from rcm.data.shards import ShardLoader
from rcm.parallel.distributed import DistributedInfo
from rcm.train import build_network

FULL = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)


def toy_config(root: Path, run_dir: Path, max_iters: int):
    return load_config([
        "experiment=toy_rcm", f"run_dir={run_dir}", f"data.shards={root / 'data'}",
        f"distill.teacher_checkpoint={root / 'teacher.pth'}", "train.batch_size=2", f"train.max_iters={max_iters}",
        "distill.tangent_warmup=2", "distill.student_update_freq=2", "train.save_every=2", "train.progress_bar=false",
        "train.device=cpu", "data.shuffle_buffer=8", "train.keep_last=3",
    ])


def _worker(rank: int, world_size: int, phase: str, root: Path, work: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from rcm.train import Trainer

    torch.set_num_threads(1)  # 4 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{work / f'store_{phase}'}", rank=rank, world_size=world_size)
    info = DistributedInfo(rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        dtensors = CheckpointManager(work / "dtensor", info, async_save=True)
        if phase == "save":
            Trainer(toy_config(root, work / "run", 2), torch.device("cpu"), info).run()
            state = {"student": {"rows": distribute_tensor(FULL, mesh, [Shard(0)]), "cols": distribute_tensor(FULL, mesh, [Shard(1)])}}
            dtensors.save(1, state, {"rank": rank}, wait=True)
            # DCP's own stager (the fallback for tensor subclasses rcm's does not know) stages DTensor shards alike.
            fallback = CheckpointManager(work / "dtensor_fallback", info, async_save=True)
            fallback._stager = DefaultStager(StagingOptions(False, False, False, False))
            fallback.save(1, state, {"rank": rank}, wait=True)
            return
        trainer = Trainer(toy_config(root, work / "run", 3), torch.device("cpu"), info)
        assert trainer.resume()
        after_resume = {"student": _full(trainer.student),
                        "loader": trainer.loader.state_dict(), "generator": trainer.generator.get_state(),
                        "iteration": trainer.iteration, "student_iteration": trainer.student_iteration}
        trainer.run()
        state = {"student": {"rows": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)]),
                             "cols": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)])}}  # another layout too
        assert dtensors.load(dtensors.latest(), state) is None  # written by 4 ranks: no rank file maps to this one
        fallback = CheckpointManager(work / "dtensor_fallback", info)
        staged_by_fallback = {"student": {"rows": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)])}}
        fallback.load_entries(fallback.latest(), staged_by_fallback)
        torch.save({"after_resume": after_resume, "loader_after_run": trainer.loader.state_dict(),
                    "rows": state["student"]["rows"].to_local(),
                    "fallback_rows": staged_by_fallback["student"]["rows"].to_local(), "cols": state["student"]["cols"].to_local(),
                    "final_student": _full(trainer.student)}, work / f"result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def _full(model) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) tensors: multi-process training shards the networks with FSDP2."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}


def test_resume_a_four_rank_checkpoint_on_two_ranks(toy_setup, tmp_path):
    """Tensors reshard exactly (DTensor rows/columns and the replicated training state); counters carry over; the
    data position keeps the consumed epoch fraction; RNG streams are re-seeded per new rank; training continues."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(4, "save", toy_setup, tmp_path), nprocs=4, join=True)
    checkpoint = tmp_path / "run/checkpoints/iter_000000002"
    assert len(list(checkpoint.glob("rank_*.pt"))) == 4
    mp.spawn(_worker, args=(2, "load", toy_setup, tmp_path), nprocs=2, join=True)

    reference = build_network(toy_config(toy_setup, tmp_path / "x", 3).model)
    load_model_weights(reference, checkpoint, prefer="student")
    saved_student = reference.state_dict()
    results = [torch.load(tmp_path / f"result_{rank}.pt", weights_only=False) for rank in range(2)]
    seed = toy_config(toy_setup, tmp_path / "x", 3).train.seed
    saved_counter = torch.load(checkpoint / "rank_00000.pt", weights_only=False)["student_iteration"]
    for rank, result in enumerate(results):
        resumed = result["after_resume"]
        assert resumed["iteration"] == 2 and resumed["student_iteration"] == saved_counter
        for key, value in saved_student.items():
            assert torch.equal(resumed["student"][key], value), key
        # 4 ranks × 2 iterations × batch 2 = 16 of 64 samples: a quarter of epoch 0, i.e. 8 of each new rank's 32.
        assert resumed["loader"] == {"epoch": 0, "samples_in_epoch": 8}
        assert result["loader_after_run"] == {"epoch": 0, "samples_in_epoch": 10}
        expected_generator = torch.Generator().manual_seed(reseeded(seed, 2, rank, "noise")).get_state()
        assert torch.equal(resumed["generator"], expected_generator)
        assert torch.equal(result["rows"], FULL[4 * rank: 4 * rank + 4])
        assert torch.equal(result["cols"], FULL[4 * rank: 4 * rank + 4])
        assert torch.equal(result["fallback_rows"], FULL[:, 3 * rank: 3 * rank + 3])
    assert all(torch.equal(results[0]["final_student"][k], results[1]["final_student"][k]) for k in saved_student)
    assert (tmp_path / "run/checkpoints/iter_000000003/COMPLETE").is_file()
    assert len(list((tmp_path / "run/checkpoints/iter_000000003").glob("rank_*.pt"))) == 2


@pytest.mark.parametrize("old_world, new_world", [(4, 2), (2, 4), (4, 1)])
def test_rederived_loader_position_keeps_the_epoch_fraction(toy_setup, old_world, new_world):
    """Whatever the split, the new ranks together skip the fraction of the epoch the old ranks consumed."""
    def loader(rank: int, world: int) -> ShardLoader:
        return ShardLoader(toy_setup / "data", batch_size=2, latent_shape=(4, 2, 8, 8), text_len=8, text_dim=32,
                           seed=0, rank=rank, world_size=world)

    total = sum(samples_in_shard(p) for p in loader(0, 1).shards)
    old = [{"epoch": 1, "samples_in_epoch": 4 if old_world > 1 else 16} for _ in range(old_world)]
    consumed = sum(p["samples_in_epoch"] for p in old)
    positions = [rederive_loader_position(loader(r, new_world), old)[0] for r in range(new_world)]
    assert all(p["epoch"] == 1 for p in positions)
    assert sum(p["samples_in_epoch"] for p in positions) == pytest.approx(consumed, abs=new_world)
    ahead = old[:-1] + [{"epoch": 2, "samples_in_epoch": 2}]  # one old rank had already finished epoch 1
    position, fraction = rederive_loader_position(loader(0, new_world), ahead)
    assert position["epoch"] == 1 and fraction > consumed / total
