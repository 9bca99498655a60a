"""The one attention entry point: `attention(q, k, v)` on (B, N, H, D) tensors, dispatched to a backend.

Backends (see `attention_backend_names()`):
- "sdpa": torch's scaled_dot_product_attention for the forward and backward, wrapped in an
  autograd.Function with an explicit JVP rule, because torch has no forward-AD formula for its fused
  SDPA kernels and the sCM loss needs `torch.func.jvp` / `torch.autograd.forward_ad` through the model.
- "math": softmax(s·QKᵀ)·V written out, in float32 or wider; the differentiable reference.
- "flash_attn": the flash-attn package (forward and backward only, no forward-mode AD).
- "triton": our Triton kernel (rcm/ops/triton_attention_jvp.py): CUDA only, with backward and JVP rule.
- "auto": an alias of "sdpa".
`attention_with_tangent` is the JVP-mode entry point: (O, Ȯ) in one pass (fused Triton kernel on CUDA).
Another backend (for example a Triton JVP kernel) is added with `register_attention_backend`: a
backend is a function `(q, k, v, scale) -> out` on (B, N, H, D) tensors with `scale` already a float.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# The JVP rule materializes one block of attention probabilities at a time; this bounds its size
# (elements of the (B, H, query_chunk, Nk) score block) so long videos do not need O(N²) memory.
_JVP_SCORE_BLOCK_ELEMENTS = 1 << 26

_BACKENDS: dict[str, AttentionBackend] = {}
_AUTO_BACKEND = "sdpa"


def register_attention_backend(name: str, function: AttentionBackend, *, replace: bool = False) -> None:
    """Make `function(q, k, v, scale) -> out` ((B, N, H, D) tensors) available as `backend=name`."""
    if name == "auto":
        raise ValueError("'auto' is an alias of the default backend and cannot be registered; pick another name.")
    if name in _BACKENDS and not replace:
        raise ValueError(f"attention backend {name!r} is already registered; pass replace=True to override it.")
    _BACKENDS[name] = function


def attention_backend_names() -> tuple[str, ...]:
    """Names accepted by `attention(..., backend=...)`, "auto" first."""
    return ("auto", *sorted(_BACKENDS))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention of q (B, Nq, H, D) over k, v (B, Nk, H, D), no mask; returns (B, Nq, H, D)."""
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = _AUTO_BACKEND if backend == "auto" else backend
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(attention_backend_names())}."
        )
    return _BACKENDS[name](q, k, v, float(scale))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise one clear sentence when q, k, v cannot be attended together."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q, k, v of shape (batch, tokens, heads, head_dim); got {shapes}.")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"attention needs the same batch size for q, k and v; got {shapes}.")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"attention needs as many keys as values (dimension 1 of k and v); got {shapes}.")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"attention needs the same number of heads for q, k and v; got {shapes}.")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"attention needs the same head_dim for q, k and v; got {shapes}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------
# math backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale·QKᵀ)·V on (B, N, H, D) tensors, computed in float32 or wider, fully differentiable."""
    compute = _compute_dtype(q.dtype)
    q_BHND, k_BHND, v_BHND = (t.transpose(1, 2).to(compute) for t in (q, k, v))
    probabilities = torch.softmax(scale * (q_BHND @ k_BHND.transpose(-1, -2)), dim=-1)
    return (probabilities @ v_BHND).transpose(1, 2).to(q.dtype)


def attention_with_tangent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_dot: torch.Tensor | None,
    k_dot: torch.Tensor | None,
    v_dot: torch.Tensor | None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) for (B, N, H, D) inputs and their tangents (None = zero); gradients flow through O only.

    On CUDA with bf16/fp16 and head_dim 64/128 the fused Triton kernel computes both in one pass;
    elsewhere O comes from ``attention(..., backend)`` and Ȯ from the blockwise reference formula.
    """
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend in ("auto", "triton") and _triton_jvp_supports(q, k, v):
        from rcm.ops.triton_attention_jvp import attention_jvp

        zeros = [torch.zeros_like(t) if t_dot is None else t_dot for t, t_dot in ((q, q_dot), (k, k_dot), (v, v_dot))]
        out, out_dot = attention_jvp(q, k, v, *zeros, scale=scale)
        return out, out_dot.detach()
    if backend == "triton":
        raise ValueError("attention backend 'triton' needs CUDA bf16/fp16 inputs with head_dim 64 or 128 and triton installed")
    out = attention(q, k, v, scale=scale, backend=backend)
    with torch.no_grad():
        transpose = lambda t: None if t is None else t.transpose(1, 2)  # noqa: E731
        out_dot = attention_jvp_reference(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), transpose(q_dot), transpose(k_dot), transpose(v_dot), scale
        ).transpose(1, 2)
    return out, out_dot


def _triton_jvp_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused Triton JVP kernel can take these inputs."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)):
        return False
    if not (k.dtype == v.dtype == q.dtype):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# sdpa backend with a JVP rule


def attention_jvp_reference(
    q_BHND: torch.Tensor,
    k_BHND: torch.Tensor,
    v_BHND: torch.Tensor,
    q_tangent: torch.Tensor | None,
    k_tangent: torch.Tensor | None,
    v_tangent: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Tangent Ȯ of O = softmax(S)·V, S = s·QKᵀ (all (B, H, N, D)); None tangents count as zero.

    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ) and Ȯ = P·V̇ + (P ⊙ Ṡ)·V − rowsum(P ⊙ Ṡ)·O, evaluated one block of queries at a
    time in float32 or wider; O is recomputed from the same P so the formula is exactly the derivative.
    """
    compute = _compute_dtype(q_BHND.dtype)
    batch, heads, num_queries, _ = q_BHND.shape
    num_keys = k_BHND.shape[2]
    k_c, v_c = k_BHND.to(compute), v_BHND.to(compute)
    k_tangent_c = None if k_tangent is None else k_tangent.to(compute)
    v_tangent_c = None if v_tangent is None else v_tangent.to(compute)
    chunk = max(1, _JVP_SCORE_BLOCK_ELEMENTS // max(1, batch * heads * num_keys))

    tangent_chunks = []
    for start in range(0, num_queries, chunk):
        q_c = q_BHND[:, :, start : start + chunk].to(compute)
        probabilities = torch.softmax(scale * (q_c @ k_c.transpose(-1, -2)), dim=-1)
        tangent = torch.zeros(q_c.shape[:-1] + (v_c.shape[-1],), dtype=compute, device=q_c.device)
        if v_tangent_c is not None:
            tangent = tangent + probabilities @ v_tangent_c
        score_tangent = None
        if q_tangent is not None:
            score_tangent = q_tangent[:, :, start : start + chunk].to(compute) @ k_c.transpose(-1, -2)
        if k_tangent_c is not None:
            from_keys = q_c @ k_tangent_c.transpose(-1, -2)
            score_tangent = from_keys if score_tangent is None else score_tangent + from_keys
        if score_tangent is not None:
            weighted = probabilities * (scale * score_tangent)
            out = probabilities @ v_c
            tangent = tangent + weighted @ v_c - weighted.sum(dim=-1, keepdim=True) * out
        tangent_chunks.append(tangent)
    return torch.cat(tangent_chunks, dim=2).to(q_BHND.dtype)


class _SDPAWithJVP(torch.autograd.Function):
    """torch SDPA on (B, H, N, D) tensors with a backward and a forward-mode (JVP) rule."""

    @staticmethod
    def forward(q_BHND, k_BHND, v_BHND, scale):
        return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q_BHND, k_BHND, v_BHND, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(q_BHND, k_BHND, v_BHND)
        ctx.save_for_forward(q_BHND, k_BHND, v_BHND)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # SDPA's own backward needs its forward intermediates (log-sum-exp), which a Function cannot
        # keep through the public API, so the forward is recomputed here under autograd.
        q_BHND, k_BHND, v_BHND = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((q_BHND, k_BHND, v_BHND), needs)]
            out = F.scaled_dot_product_attention(*inputs, scale=ctx.scale)
            wanted = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if need else None for need in needs), None)

    @staticmethod
    def jvp(ctx, q_tangent, k_tangent, v_tangent, scale_tangent):
        q_BHND, k_BHND, v_BHND = ctx.saved_tensors
        return attention_jvp_reference(q_BHND, k_BHND, v_BHND, q_tangent, k_tangent, v_tangent, ctx.scale)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch SDPA on (B, N, H, D) tensors that also works under torch.func.jvp and forward_ad."""
    out_BHND = _SDPAWithJVP.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return out_BHND.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# flash_attn backend


def flash_attn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """flash-attn's kernel on (B, N, H, D) float16/bfloat16 CUDA tensors (no forward-mode AD)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise ImportError(
            "attention backend 'flash_attn' needs the flash-attn package, which does not import here "
            f"({error}); install it (pip install flash-attn) or use backend='sdpa'."
        ) from error
    if q.dtype not in (torch.float16, torch.bfloat16) or not q.is_cuda:
        raise ValueError(
            f"attention backend 'flash_attn' runs on float16/bfloat16 CUDA tensors; got {q.dtype} on "
            f"{q.device}; use backend='sdpa' for other inputs."
        )
    return flash_attn_func(q, k, v, softmax_scale=scale)


register_attention_backend("sdpa", sdpa_attention)
register_attention_backend("math", math_attention)
register_attention_backend("flash_attn", flash_attn_attention)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Our Triton flash-attention kernel (CUDA, bf16/fp16, head_dim 64/128), with backward and JVP rule."""
    from rcm.ops.triton_attention_jvp import attention as triton_attention_function

    return triton_attention_function(q, k, v, scale)


register_attention_backend("triton", triton_attention)
