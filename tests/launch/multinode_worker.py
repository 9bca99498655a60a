"""What one srun task of a multi-node test runs: ``python -m tests.launch.multinode_worker MODE OUT_DIR``.

- ``mapping``: map Slurm's variables to torch.distributed's (rcm.launch.environment), join the gloo group
  over TCP between the "nodes", all-reduce and all-gather, and write what this task saw to OUT_DIR/rank_R.json.
- ``parallel``: the dp_shard × cp = 2 × 2 scenarios of tests/parallel (one rCM step of tiny DiTs under FSDP2 +
  Ulysses CP), every rank's losses and whole gradients saved to OUT_DIR for comparison with one process.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rcm.launch.environment import export_launcher_torch_env

PARALLEL_SCENARIOS = {  # the 4-rank scenarios of tests/parallel/test_parallelize.py that use dp_shard × cp
    "fsdp2_cp2_student": dict(dp_shard=2, cp=2, step="student"),
    "fsdp2_cp2_fake_score": dict(dp_shard=2, cp=2, step="fake_score"),
}


def join_group() -> tuple[int, int, list[str]]:
    """(rank, world size, every rank's host name) after joining the gloo group through the launcher's variables."""
    assert export_launcher_torch_env(), "not started as one task of a Slurm step"
    dist.init_process_group("gloo")
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return dist.get_rank(), dist.get_world_size(), hosts


def run_mapping(out_dir: Path) -> None:
    """Record the mapped variables, the host, and the results of two collectives across the nodes."""
    rank, world_size, hosts = join_group()
    mapped = {key: os.environ[key] for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                               "LOCAL_WORLD_SIZE", "NODE_RANK")}
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    record = {**mapped, "host": socket.gethostname(), "slurm_procid": os.environ["SLURM_PROCID"],
              "all_reduce": total.item(), "hosts": hosts, "group_rank": rank, "group_size": world_size}
    (out_dir / f"rank_{rank}.json").write_text(json.dumps(record))


def run_parallel(out_dir: Path) -> None:
    """Each dp_shard × cp scenario on this rank, with the node of every mesh peer recorded."""
    from rcm.parallel.mesh import build_device_mesh, data_parallel_rank
    from tests.helpers import TINY
    from tests.parallel.workers import parallel_config, run_step

    torch.set_num_threads(1)
    rank, world_size, hosts = join_group()
    for name, spec in PARALLEL_SCENARIOS.items():
        mesh = build_device_mesh(parallel_config(spec), world_size, "cpu", num_heads=TINY["num_heads"])
        result = run_step(spec, mesh, data_parallel_rank(mesh))
        result.update(dp_rank=data_parallel_rank(mesh), hosts=hosts)
        torch.save(result, out_dir / f"{name}.rank{rank}.pt")


def main() -> None:
    """Entry point of one task."""
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    try:
        {"mapping": run_mapping, "parallel": run_parallel}[mode](out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
