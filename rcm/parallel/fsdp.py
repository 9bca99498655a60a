"""FSDP2 (`fully_shard`) for the DiT: one parameter group per block, then the root (embeddings and head).

The DiT's JVP mode is plain tensors in, (output, tangent) out, so it runs through FSDP's hooks like any
forward; forward-mode AD dual tensors do not (docs/parallelism.md).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mixed_precision_policy(param_dtype: str, reduce_dtype: str, device_type: str) -> MixedPrecisionPolicy:
    """Unsharded parameters in ``param_dtype``, gradient reductions in ``reduce_dtype`` — on CUDA only.

    Elsewhere (CPU runs are tests and toys) parameters keep their own dtype, as `train.mixed_precision`
    does for autocast. Inputs are never cast: the DiT keeps its time path, residual stream and timesteps
    in float32 on purpose (a bfloat16 timestep near 1000 is off by up to 4) and casts to the parameters'
    dtype itself before each Linear.
    """
    if device_type != "cuda":
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype],
                                cast_forward_inputs=False)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy,
    reshard_after_forward: bool = True,
    gradient_divide_factor: float | None = None,
) -> None:
    """Shard each of ``model.blocks``, then the rest of ``model``, over ``mesh`` (1-D: FSDP; 2-D: HSDP, replicate × shard).

    ``gradient_divide_factor``: what summed gradients are divided by (default: the mesh size). With context
    parallelism each rank holds a part of one sample's gradient, so the right factor is the number of
    data-parallel ranks, not the mesh size.
    """
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if gradient_divide_factor is not None:
        for module in fsdp_modules(model):
            module.set_gradient_divide_factor(float(gradient_divide_factor))
            if mesh.device_type != "cuda":
                # A divide factor other than the group size needs PREMUL_SUM, which gloo lacks:
                # sum, then divide.
                module.set_force_sum_reduction_for_comms(True)


def store_parameters_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point parameters to ``dtype`` in place; buffers keep theirs."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The FSDP-sharded modules of ``model`` (empty if it is not sharded)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks in the next backward (True) or only accumulate them locally (False).

    For gradient accumulation: off for all micro-batches but the last. A no-op for an unsharded model,
    whose gradients the training loop reduces itself after the last micro-batch.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)


__all__ = ["DTYPES", "apply_fsdp", "fsdp_modules", "mixed_precision_policy", "set_gradient_sync", "store_parameters_in"]
