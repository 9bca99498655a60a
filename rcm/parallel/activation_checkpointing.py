"""Activation checkpointing of DiT blocks, applied from outside the model, correct in JVP mode.

Plain forwards use torch's non-reentrant checkpoint. In JVP mode (a block called with tangents) the
block runs once under no_grad producing (x, ẋ); backward recomputes the primal path only — the tangent
is never needed for gradients, so recomputing it would waste the tangent's extra matmuls.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _TangentBlockCheckpoint(torch.autograd.Function):
    """Forward: the block with tangents, no graph. Backward: recompute the primal block, backpropagate."""

    @staticmethod
    def forward(ctx, block_forward, x, time_B6D, context, cos, sin, x_dot, time_dot):
        ctx.block_forward = block_forward
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, time_B6D, context, cos, sin)
        out, out_dot = block_forward(x, time_B6D, context, (cos, sin), x_dot, time_dot)
        ctx.mark_non_differentiable(out_dot)
        return out, out_dot

    @staticmethod
    def backward(ctx, grad_out, grad_out_dot):
        x, time_B6D, context, cos, sin = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, time_B6D, context), needs)]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            out = ctx.block_forward(*inputs, (cos, sin))
        torch.autograd.backward(out, grad_out)
        return (None, *(t.grad if need else None for t, need in zip(inputs, needs)), None, None, None, None)


def _checkpointed_block_forward(original_forward, x, time_B6D, context, rope, x_dot=None, time_dot=None):
    if not torch.is_grad_enabled():  # nothing to save (also keeps functorch transforms away from checkpoint)
        return original_forward(x, time_B6D, context, rope, x_dot, time_dot)
    if x_dot is None:
        return checkpoint(original_forward, x, time_B6D, context, rope, use_reentrant=False)
    return _TangentBlockCheckpoint.apply(original_forward, x, time_B6D, context, rope[0], rope[1], x_dot, time_dot)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Checkpoint every ``every``-th block of ``model.blocks`` (1: all); returns how many were wrapped.

    The block's forward is replaced on the instance, so parameter names (and checkpoint keys) stay the
    same and FSDP hooks registered on the block still run around it.
    """
    if every < 1:
        raise ValueError(f"activation checkpointing: every must be ≥ 1, got {every}")
    wrapped = 0
    for index, block in enumerate(model.blocks):
        if index % every == 0 and not getattr(block, "_rcm_checkpointed", False):
            block.forward = functools.partial(_checkpointed_block_forward, block.forward)
            block._rcm_checkpointed = True
            wrapped += 1
    return wrapped
