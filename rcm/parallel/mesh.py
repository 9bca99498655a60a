"""The device mesh: data-parallel replicate × data-parallel shard × context parallel, from the config.

Ranks are laid out with ``cp`` innermost, then ``dp_shard``, then ``dp_replicate``: the Ulysses
all-to-alls (the most traffic per step) stay between neighbouring ranks, i.e. inside a node, and the
FSDP all-gathers / reduce-scatters over ``dp_shard × cp`` next; only HSDP's gradient all-reduce
crosses the ``dp_replicate`` groups. `ParallelMesh` holds two views of the same ranks, each a
DeviceMesh of its own (unflattened from the 1-D world, so no flattened dimension is sliced later):

- ``data`` = (dp, cp): ``dp`` = dp_replicate × dp_shard are the ranks that see different data (loader
  rank, generator seed); ``cp`` are the ranks of one context-parallel group (same batch, same noise,
  different tokens);
- ``fsdp`` = (dp_replicate, dp_shard_cp), or 1-D dp_shard_cp without replicas: FSDP2 shards the
  parameters over dp_shard × cp (CP ranks hold the same weights, so they share the shards too) and
  HSDP all-reduces between replicas.

Why torch's DeviceMesh and not megatron-core's ``parallel_state``: FSDP2 (``fully_shard``), DTensor and
DCP checkpoints take a DeviceMesh directly, a mesh is a value (no module-level global state, so tests
can build several in one process), its named, flattened sub-meshes cover every group we need, and it
adds no dependency; megatron-core would bring Transformer Engine/apex and a tensor/pipeline-parallel
layout this model does not use, and we would still have to convert its groups into a mesh for FSDP2.
See docs/parallelism.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from rcm.parallel.activation_checkpointing import BLOCK, POLICIES as AC_POLICIES



class ParallelConfigError(ValueError):
    """An impossible mesh or parallel setting; the message names the key."""


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three mesh dimensions; their product is the number of processes."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1

    @property
    def world_size(self) -> int:
        """Processes the mesh spans."""
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different data: dp_replicate × dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shard_size(self) -> int:
        """Ranks among which FSDP2 shards each parameter: dp_shard × cp."""
        return self.dp_shard * self.cp


def _compile_backends() -> list[str]:
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def parallel_config_problems(config: Any, num_heads: int | None = None, num_tokens: int | None = None) -> list[str]:
    """Every problem of a ``parallel`` config section that is visible before the job starts, one sentence each.

    ``num_heads`` (the model's attention heads) and ``num_tokens`` (T'·H'·W' of the latent after patching)
    enable the context-parallel checks.
    """
    problems = []
    for key in ("dp_replicate", "cp", "grad_accumulation"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"parallel.{key} must be a positive integer, got {value!r}.")
    dp_shard = config.dp_shard
    if isinstance(dp_shard, bool) or not isinstance(dp_shard, int) or (dp_shard < 1 and dp_shard != -1):
        problems.append(f"parallel.dp_shard must be a positive integer or -1 (all ranks the other sizes leave), got {dp_shard!r}.")
    every = config.activation_checkpointing_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        problems.append(f"parallel.activation_checkpointing_every must be 0 (off) or k ≥ 1 (every k-th block), got {every!r}.")
    ac_policy = getattr(config, "activation_checkpointing", BLOCK)
    if ac_policy not in AC_POLICIES:
        problems.append(f"parallel.activation_checkpointing must be one of {', '.join(AC_POLICIES)}, got {ac_policy!r}.")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(config, key) not in ("float32", "bfloat16"):
            problems.append(f"parallel.{key} must be 'float32' or 'bfloat16', got {getattr(config, key)!r}.")
    if config.compile and config.compile_backend not in (backends := _compile_backends()):
        problems.append(f"parallel.compile_backend must be a torch.compile backend ({', '.join(backends)}), "
                        f"got {config.compile_backend!r}.")
    cp = config.cp
    if isinstance(cp, int) and cp > 1:
        if num_heads is not None and num_heads % cp:
            problems.append(f"parallel.cp={cp} must divide the model's {num_heads} attention heads "
                            "(Ulysses gives each context-parallel rank num_heads/cp whole heads).")
        if num_tokens is not None and num_tokens % cp:
            problems.append(f"parallel.cp={cp} must divide the {num_tokens} video tokens of data.latent_shape "
                            "(each rank holds num_tokens/cp of them); choose a latent size or a cp that divides it.")
    return problems


def resolve_parallel_dims(config: Any, world_size: int) -> ParallelDims:
    """The mesh sizes for ``world_size`` processes (``dp_shard = -1`` takes what the others leave); raises
    ParallelConfigError with one sentence per problem."""
    problems = parallel_config_problems(config)
    if problems:
        raise ParallelConfigError(" ".join(problems))
    dp_replicate, cp, dp_shard = config.dp_replicate, config.cp, config.dp_shard
    if dp_shard == -1:
        if world_size % (dp_replicate * cp):
            raise ParallelConfigError(
                f"parallel.dp_replicate × parallel.cp = {dp_replicate}×{cp} does not divide the {world_size} processes "
                "of this job, so parallel.dp_shard=-1 has no size; change the sizes or the number of processes.")
        dp_shard = world_size // (dp_replicate * cp)
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp)
    if dims.world_size != world_size:
        raise ParallelConfigError(
            f"parallel.dp_replicate × parallel.dp_shard × parallel.cp = {dp_replicate}×{dp_shard}×{cp} = {dims.world_size} "
            f"but the job has {world_size} processes; make the product equal the number of processes (or set dp_shard=-1).")
    return dims


@dataclass(frozen=True)
class ParallelMesh:
    """The job's meshes: ``data`` (dp, cp) for data and context parallelism, ``fsdp`` for parameter sharding."""

    dims: ParallelDims
    data: DeviceMesh
    fsdp: DeviceMesh

    @property
    def cp(self) -> DeviceMesh:
        """This rank's context-parallel group (1-D)."""
        return self.data["cp"]

    @property
    def device_type(self) -> str:
        """'cuda' or 'cpu'."""
        return self.data.device_type


def build_device_mesh(config: Any, world_size: int, device_type: str, num_heads: int | None = None) -> ParallelMesh | None:
    """The meshes of this job for the ``parallel`` config section; None for a single process (nothing to shard).

    Needs the default process group when there is more than one process.
    """
    dims = resolve_parallel_dims(config, world_size)
    if num_heads is not None and num_heads % dims.cp:
        raise ParallelConfigError(parallel_config_problems(config, num_heads=num_heads)[0])
    if world_size == 1:
        return None
    if not dist.is_initialized():
        raise RuntimeError(f"build_device_mesh needs the process group of the job's {world_size} processes; "
                           "call rcm.parallel.distributed.init_distributed first.")
    world = init_device_mesh(device_type, (world_size,), mesh_dim_names=("world",))
    data = world._unflatten(0, (dims.data_parallel_size, dims.cp), ("dp", "cp"))
    fsdp = world._unflatten(0, (dims.dp_replicate, dims.fsdp_shard_size), ("dp_replicate", "dp_shard_cp"))
    if dims.dp_replicate == 1:
        fsdp = fsdp["dp_shard_cp"]
    return ParallelMesh(dims=dims, data=data, fsdp=fsdp)


def mesh_dims(mesh: ParallelMesh | None) -> ParallelDims:
    """The sizes of a mesh from `build_device_mesh` (all 1 for None)."""
    return ParallelDims() if mesh is None else mesh.dims


def data_parallel_rank(mesh: ParallelMesh | None) -> int:
    """This rank's index among the ranks that see different data; every rank of a CP group has the same one.

    Seed the data loader's shard and the distiller's generator with it (not with the global rank): a
    context-parallel group must draw the same batch, noise and times.
    """
    return 0 if mesh is None else mesh.data["dp"].get_local_rank()


__all__ = [
    "ParallelConfigError", "ParallelDims", "ParallelMesh", "parallel_config_problems", "resolve_parallel_dims",
    "build_device_mesh", "mesh_dims", "data_parallel_rank",
]
