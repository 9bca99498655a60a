"""Process-group set-up (torchrun, srun or submitit tasks: rcm.launch.environment) and plain data-parallel
gradient sync.

The model never sees any of this: the training loop calls these around it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rcm.cli_errors import UserError
from rcm.launch.environment import apply_env_defaults, export_launcher_torch_env, local_rank


@dataclass(frozen=True)
class DistributedInfo:
    """Who this process is."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes markers and shows progress."""
        return self.rank == 0


def init_distributed(
    device: torch.device, timeout_minutes: float = 30.0, env_defaults: Mapping[str, str] | None = None
) -> DistributedInfo:
    """Join the process group when launched as several processes (torchrun, srun, submitit); a no-op otherwise.

    ``timeout_minutes`` bounds every collective: a rank that stops answering makes the others fail
    instead of waiting forever. ``env_defaults`` (NCCL settings) apply where the user has not set them.
    """
    export_launcher_torch_env()  # srun / submitit tasks: SLURM_PROCID ... -> RANK, WORLD_SIZE, MASTER_ADDR ...
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and env_defaults:
            apply_env_defaults(env_defaults)
        # device_id binds NCCL to this rank's GPU now (no guessing the GPU from the global rank at the first barrier)
        device_id = device if backend == "nccl" and device.index is not None else None
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes), device_id=device_id)
    return DistributedInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank())


def resolve_device(name: str) -> torch.device:
    """'auto' picks this process's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device is 'cuda' but no CUDA device is visible; use train.device=cpu")
        index = local_rank()
        visible = torch.cuda.device_count()
        if visible == 1:  # srun --gpus-per-task=1: each task sees only its own GPU
            index = 0
        elif index >= visible:
            # Before any process group or training: a job whose tasks per node exceed the node's GPUs.
            raise UserError(f"local rank {index} has no GPU of its own: only {visible} are visible on this node; "
                            "start one task per GPU (tasks per node = GPUs per node)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def barrier(info: DistributedInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.world_size > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
