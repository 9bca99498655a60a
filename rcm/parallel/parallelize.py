"""`parallelize_wan_dit`: context parallelism, activation checkpointing and FSDP2 applied to a plain WanDiT.

The order is fixed, as in torchtitan: context parallelism first (it swaps the attention and token
hooks that the blocks call), torch.compile of each block (optional) next, activation checkpointing
then (it wraps the block's forward, so a recompute also repeats the Ulysses all-to-alls), FSDP2 last
(its hooks go around everything else).
Build every network (student, fake score, teacher) in full first, then parallelize each: a sharded
module can no longer be deep-copied.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from rcm.parallel.activation_checkpointing import apply_activation_checkpointing
from rcm.parallel.compile import apply_compile
from rcm.parallel.context_parallel import apply_context_parallel
from rcm.parallel.fsdp import apply_fsdp, mixed_precision_policy, store_parameters_in
from rcm.parallel.mesh import ParallelMesh


def parallelize_wan_dit(model: nn.Module, mesh: ParallelMesh | None, config: Any, *, frozen: bool = False) -> nn.Module:
    """Apply the ``parallel`` config section to ``model`` over ``mesh`` (from `build_device_mesh`); returns the model.

    ``frozen`` (the teacher): no activation checkpointing (it never runs with gradients) and parameters
    resharded after every forward; its parameters must not require gradients, so FSDP keeps no gradient
    for them and no optimizer is ever built on them. Its shards are stored in the policy's parameter dtype
    (bf16 on CUDA): FSDP would cast each fp32 shard to it before gathering anyway, so the forward is the
    same and the teacher takes half the memory (3.3 GiB a GPU for the 14B on 8 GPUs).
    ``mesh`` None (one process): only checkpointing.
    """
    if frozen and any(p.requires_grad for p in model.parameters()):
        raise ValueError("parallelize_wan_dit(frozen=True) is for the teacher: call model.requires_grad_(False) first.")
    if mesh is not None:
        apply_context_parallel(model, mesh.cp)
    if config.compile:
        apply_compile(model, backend=config.compile_backend)
    if not frozen and config.activation_checkpointing_every > 0:
        apply_activation_checkpointing(model, every=config.activation_checkpointing_every,
                                       policy=getattr(config, "activation_checkpointing", "block"))
    if mesh is None:
        return model
    dims = mesh.dims
    policy = mixed_precision_policy(config.param_dtype, config.reduce_dtype, mesh.device_type)
    # With cp > 1 a rank's gradient is the part from its own tokens: sum over CP, average over data.
    divide_factor = dims.data_parallel_size if dims.cp > 1 else None
    if frozen and policy.param_dtype is not None:
        store_parameters_in(model, policy.param_dtype)
    apply_fsdp(model, mesh.fsdp, policy, reshard_after_forward=frozen or config.reshard_after_forward,
               gradient_divide_factor=divide_factor)
    return model


__all__ = ["parallelize_wan_dit"]
