"""Activation checkpointing of DiT blocks, applied from outside the model, correct in JVP mode.

Two policies (``parallel.activation_checkpointing``), as the reference recipe uses them:

- ``block`` (1.3B): nothing inside a block is kept; backward recomputes the block. Plain forwards use torch's
  non-reentrant checkpoint. In JVP mode (a block called with tangents) the block runs once under no_grad
  producing (x, ẋ); backward recomputes the primal path only — the tangent is never needed for gradients,
  so recomputing it would waste the tangent's extra matmuls.
- ``mm_only`` (14B): torch's selective checkpointing keeps the outputs of the primal's matrix multiplications
  and recomputes everything else (norms, modulation, activations, attention). The tangent's matmuls (run
  under no_grad inside the model) are not kept: gradients never need them. In JVP mode the block runs under
  the same selective checkpoint, so its recompute replays the tangent's cheap element-wise work too.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

BLOCK, MM_ONLY = "block", "mm_only"
POLICIES = (BLOCK, MM_ONLY)
_aten = torch.ops.aten
MATMUL_OPS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
                        _aten.matmul.default, _aten.linear.default, _aten._scaled_mm.default})


def _keep_primal_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy of ``mm_only``: keep matmul outputs computed with gradients on."""
    if op in MATMUL_OPS and torch.is_grad_enabled():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _matmul_saving_contexts():
    return create_selective_checkpoint_contexts(_keep_primal_matmuls)


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


def _selectively_checkpointed_block_forward(original_forward, x, time_B6D, context, rope, x_dot=None, time_dot=None):
    if not torch.is_grad_enabled():
        return original_forward(x, time_B6D, context, rope, x_dot, time_dot)
    return checkpoint(original_forward, x, time_B6D, context, rope, x_dot, time_dot, use_reentrant=False,
                      context_fn=_matmul_saving_contexts)


def apply_activation_checkpointing(model: nn.Module, every: int = 1, policy: str = BLOCK) -> int:
    """Checkpoint every ``every``-th block of ``model.blocks`` (1: all) with ``policy`` (``block`` or
    ``mm_only``); returns how many were wrapped.

    The block's forward is replaced on the instance, so parameter names (and checkpoint keys) stay the
    same and FSDP hooks registered on the block still run around it.
    """
    if every < 1:
        raise ValueError(f"activation checkpointing: every must be ≥ 1, got {every}")
    if policy not in POLICIES:
        raise ValueError(f"parallel.activation_checkpointing must be one of {', '.join(POLICIES)}, got {policy!r}")
    wrapper = _checkpointed_block_forward if policy == BLOCK else _selectively_checkpointed_block_forward
    wrapped = 0
    for index, block in enumerate(model.blocks):
        if index % every == 0 and not getattr(block, "_rcm_checkpointed", False):
            block.forward = functools.partial(wrapper, block.forward)
            block._rcm_checkpointed = True
            wrapped += 1
    return wrapped
