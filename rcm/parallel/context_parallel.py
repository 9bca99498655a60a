"""Ulysses context parallelism for the Wan DiT, applied from outside the model (`apply_context_parallel`).

Each rank of a context-parallel (CP) group keeps N/cp of the N video tokens from the patch embedding
to the head: `WanDiT.shard_tokens` takes this rank's contiguous share (of the tokens, their tangents and
the RoPE tables) and `WanDiT.gather_tokens` all-gathers the head's patches, so the model's output, and
everything the distiller computes from it, is the full tensor on every rank of the group.

Self-attention needs every token: one all-to-all turns q, k, v from (B, N/cp, H, D) into
(B, N, H/cp, D), attention runs on this rank's heads, and one all-to-all turns the result back. In JVP
mode q̇, k̇, v̇ travel in the same all-to-all as q, k, v (concatenated), and Ȯ with O, so the tangent
costs no extra collective launch. Cross-attention needs no communication: every video token attends
to the whole text independently, and the text (512 tokens) is replicated on all ranks, so each rank
attends its own queries over all text keys — splitting heads there would add two all-to-alls and save
only the text's small K/V projection.

What this asks of the caller: every rank of a CP group must run the same computation on the same
inputs — the same batch, noise and times (seed the generator with `mesh.data_parallel_rank`, not the
global rank). The gather's backward keeps this rank's slice of the (identical) output gradient, so
each rank's parameter gradients are the contribution of its own tokens, and the full gradient is their
sum over the CP group (FSDP's divide factor accounts for it: rcm/parallel/fsdp.py).

Token counts must be divisible by cp: padding would need a key mask, which the attention entry point
does not take, so an uneven split is refused with a clear error instead.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def _exchange(tensors: list[torch.Tensor], group: dist.ProcessGroup, size: int, to_heads: bool) -> list[torch.Tensor]:
    """One all-to-all for all ``tensors`` (same shape and dtype).

    to_heads: (B, N/size, H, D) each → (B, N, H/size, D); otherwise the inverse.
    """
    if not tensors:
        return []
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
        raise ValueError("context-parallel attention exchanges tensors of one shape and dtype; got "
                         f"{[(tuple(t.shape), t.dtype) for t in tensors]}.")
    batch, tokens, heads, head_dim = first.shape
    stacked = torch.stack(tensors)  # (S, B, tokens, heads, D)
    if to_heads:
        # chunk j of dim 0 goes to rank j: that rank's heads of my tokens
        send = stacked.view(len(tensors), batch, tokens, size, heads // size, head_dim).permute(3, 0, 1, 2, 4, 5)
    else:
        # chunk j of dim 0 goes to rank j: its tokens of my heads
        send = stacked.view(len(tensors), batch, size, tokens // size, heads, head_dim).permute(2, 0, 1, 3, 4, 5)
    send = send.contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    if to_heads:  # chunk i holds rank i's tokens: put them in sequence order
        out = received.permute(1, 2, 0, 3, 4, 5).reshape(len(tensors), batch, size * tokens, heads // size, head_dim)
    else:  # chunk i holds head group i of my tokens
        out = received.permute(1, 2, 3, 0, 4, 5).reshape(len(tensors), batch, tokens // size, size * heads, head_dim)
    return list(out.unbind(0))


class _AllToAllWithTangents(torch.autograd.Function):
    """All-to-all of primals (differentiable) and tangents (not) in one collective; backward moves only primal grads."""

    @staticmethod
    def forward(ctx, group, size, to_heads, num_primals, *tensors):
        ctx.group, ctx.size, ctx.to_heads, ctx.num_primals = group, size, to_heads, num_primals
        ctx.num_tangents = len(tensors) - num_primals
        outputs = _exchange(list(tensors), group, size, to_heads)
        ctx.mark_non_differentiable(*outputs[num_primals:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        # Tangent outputs are non-differentiable: nothing is sent back for them.
        inputs_grads = _exchange(list(grads[: ctx.num_primals]), ctx.group, ctx.size, not ctx.to_heads)
        return (None, None, None, None, *inputs_grads, *([None] * ctx.num_tangents))


# Compiled blocks (parallel.compile) break their graph here: Dynamo cannot trace a call on the process
# group, and the exchange is one opaque collective anyway, like the attention kernel between the two.
@torch.compiler.disable
def _all_to_all(primals: list[torch.Tensor], tangents: list[torch.Tensor], group, size: int, to_heads: bool):
    """(primals, tangents) exchanged sequence ↔ heads in one collective."""
    outputs = _AllToAllWithTangents.apply(group, size, to_heads, len(primals), *primals, *tangents)
    return list(outputs[: len(primals)]), list(outputs[len(primals):])


class _GatherTokens(torch.autograd.Function):
    """All-gather along the token axis; backward keeps this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, tokens, dim, group, size, rank):
        ctx.dim, ctx.rank, ctx.local = dim, rank, tokens.shape[dim]
        parts = [torch.empty_like(tokens, memory_format=torch.contiguous_format) for _ in range(size)]
        dist.all_gather(parts, tokens.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local), None, None, None, None


class ContextParallelTokens:
    """This rank's share of the video tokens and the gather of all shares, for one CP group."""

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def shard(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """The contiguous 1/size of ``tokens`` along ``dim`` that this rank keeps."""
        total = tokens.shape[dim]
        if total % self.size:
            raise ValueError(
                f"context parallelism splits the video's {total} tokens (T'·H'·W' after patching) over cp={self.size} "
                f"ranks, but {total} is not divisible by {self.size}; choose a latent size whose token count is a "
                "multiple of cp, or a cp that divides it (uneven shares would need an attention mask).")
        local = total // self.size
        return tokens.narrow(dim, self.rank * local, local)

    def gather(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's share concatenated along ``dim`` in rank order (differentiable)."""
        return _GatherTokens.apply(tokens, dim, self.group, self.size, self.rank)


def _ulysses_attend(original_attend, group, size: int, q, k, v):
    """Sequence-sharded q, k, v → head-sharded full sequence, attention, and back."""
    (q, k, v), _ = _all_to_all([q, k, v], [], group, size, to_heads=True)
    (out,), _ = _all_to_all([original_attend(q, k, v)], [], group, size, to_heads=False)
    return out


def _ulysses_attend_with_tangent(original_attend_with_tangent, group, size: int, q, k, v, q_dot, k_dot, v_dot):
    """`_ulysses_attend` in JVP mode: tangents ride in the primals' all-to-alls (None tangents stay None)."""
    given = [t for t in (q_dot, k_dot, v_dot) if t is not None]
    (q, k, v), given = _all_to_all([q, k, v], given, group, size, to_heads=True)
    exchanged = iter(given)
    q_dot, k_dot, v_dot = (None if t is None else next(exchanged) for t in (q_dot, k_dot, v_dot))
    out, out_dot = original_attend_with_tangent(q, k, v, q_dot, k_dot, v_dot)
    (out,), (out_dot,) = _all_to_all([out], [out_dot], group, size, to_heads=False)
    return out, out_dot


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Make ``model`` (a WanDiT) run sequence-sharded over the 1-D ``cp_mesh``, Ulysses all-to-all around self-attention.

    Replaces `shard_tokens` / `gather_tokens` on the model and `attend` / `attend_with_tangent` on each
    block's self-attention, on the instances: parameter names and checkpoint keys do not change. Apply
    before activation checkpointing and FSDP (rcm.parallel.parallelize.parallelize_wan_dit does).
    """
    size = cp_mesh.size()
    if size == 1:
        return
    if getattr(model, "_rcm_context_parallel", False):
        raise ValueError("context parallelism is already applied to this model.")
    group, rank = cp_mesh.get_group(), cp_mesh.get_local_rank()
    for index, block in enumerate(model.blocks):
        attention = block.self_attn
        if attention.num_heads % size:
            raise ValueError(f"context parallelism over cp={size} ranks needs num_heads divisible by {size}; "
                             f"block {index}'s self-attention has {attention.num_heads} heads.")
        attention.attend = functools.partial(_ulysses_attend, attention.attend, group, size)
        attention.attend_with_tangent = functools.partial(_ulysses_attend_with_tangent, attention.attend_with_tangent, group, size)
    tokens = ContextParallelTokens(group, size, rank)
    model.shard_tokens = tokens.shard
    model.gather_tokens = tokens.gather
    model._rcm_context_parallel = True


__all__ = ["ContextParallelTokens", "apply_context_parallel"]
