"""Triton FlashAttention with a fused forward-mode tangent (JVP), for rCM distillation.

Math (rcm_spec.md §6). For O = softmax(S)·V with S = s·QKᵀ and tangents (Q̇, K̇, V̇):
    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ),   Ȯ = P·V̇ + (P⊙Ṡ)·V − diag(rowsum(P⊙Ṡ))·O.
One pass over the keys keeps, per query block, the running max m, the row sum l, Õ = P̃V,
T̃ = P̃V̇ + (P̃⊙Ṡ)V (the spec's Ã + B̃ in one accumulator: both end up divided by l and added,
so summing them early saves a whole D-column fp32 accumulator per row) and r̃ = rowsum(P̃⊙Ṡ);
all four are rescaled by the running-max correction. The epilogue writes
O = Õ/l, Ȯ = T̃/l − (r̃/l)·O and the natural-log log-sum-exp that the backward needs.
In bf16 the kernel usually skips the rescaling altogether: after the first key block it checks
(Cauchy-Schwarz on the row norms) that no later score can exceed the running max by 2^64, and
then keeps that max fixed (see `_online_jvp_step`). docs/attention_jvp_notes.md has the history.

Layout is the model's (B, N, H, D) = [batch, sequence, heads, head_dim]; any strides with a unit
last stride are read in place. The backward of the primal (dQ, dK, dV through O only) is
PyTorch's cuDNN (default) or FlashAttention-2 backward fed our O and log-sum-exp.

Public surface:
    attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale=None) -> (out, out_dot)
    attention(q, k, v, scale=None) -> out        # forward/backward/jvp via TritonAttention
    TritonAttentionWithTangent, TritonAttention  # the autograd.Functions behind them
    primal_backward(...)                         # dQ, dK, dV from O and LSE

CPU testing: with TRITON_INTERPRET=1 set before triton is imported the same kernels run on CPU
tensors in float32 (bf16 is not exact under the interpreter, so it is refused there).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (64, 128)
GPU_DTYPES = (torch.bfloat16, torch.float16)


def is_interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_key_block(
    k_desc, v_desc, k_dot_desc, v_dot_desc, k_base, v_base, k_dot_base, v_dot_base,
    s_kn, s_vn, s_kdn, s_vdn, col_start, n_keys,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TANGENT: tl.constexpr, USE_TMA: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """K, K̇, V, V̇ tiles [BLOCK_N, D] of keys col_start…; past-the-end keys read as zeros."""
    if USE_TMA:
        k = k_desc.load([col_start, 0])
        v = v_desc.load([col_start, 0])
        if HAS_TANGENT:
            k_dot = k_dot_desc.load([col_start, 0])
            v_dot = v_dot_desc.load([col_start, 0])
        else:
            k_dot = k
            v_dot = v
    else:
        cols = col_start + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        if MASK_ROWS:
            col_ok = (cols < n_keys)[:, None]
            k = tl.load(k_base + cols[:, None] * s_kn + dims[None, :], mask=col_ok, other=0.0)
            v = tl.load(v_base + cols[:, None] * s_vn + dims[None, :], mask=col_ok, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * s_kn + dims[None, :])
            v = tl.load(v_base + cols[:, None] * s_vn + dims[None, :])
        if HAS_TANGENT:
            if MASK_ROWS:
                k_dot = tl.load(k_dot_base + cols[:, None] * s_kdn + dims[None, :], mask=col_ok, other=0.0)
                v_dot = tl.load(v_dot_base + cols[:, None] * s_vdn + dims[None, :], mask=col_ok, other=0.0)
            else:
                k_dot = tl.load(k_dot_base + cols[:, None] * s_kdn + dims[None, :])
                v_dot = tl.load(v_dot_base + cols[:, None] * s_vdn + dims[None, :])
        else:
            k_dot = k
            v_dot = v
    return k, k_dot, v, v_dot


@triton.jit
def _online_jvp_step(
    q, q_dot, k, k_dot, v, v_dot,
    m_i, l_i, r_i, acc_out, acc_tangent,
    qk_scale_log2, scale, col_start, n_keys, keep_max,
    HAS_TANGENT: tl.constexpr, MASK_COLUMNS: tl.constexpr, BLOCK_N: tl.constexpr, MAY_KEEP_MAX: tl.constexpr,
    TANGENTS_PRESCALED: tl.constexpr,
):
    """One key block of the online softmax with tangent; returns the updated running state.

    With MAY_KEEP_MAX and a true `keep_max` (uniform over the program) the running max m_i stays
    as it is: the caller has proved that no score exceeds it by more than 2^64, which bf16 and
    fp32 hold exactly. That drops the row max, the correction factor and the rescaling of both
    accumulators, about a third of the arithmetic per score.
    """
    k_t = tl.trans(k)
    scores = tl.dot(q, k_t)
    if HAS_TANGENT:
        # Ṡ is issued right behind S: the compiler then interleaves these tensor-core
        # instructions with the softmax arithmetic below (measured +5%, notes v2).
        score_dot = tl.dot(q_dot, k_t)
        score_dot = tl.dot(q, tl.trans(k_dot), score_dot)
    if MASK_COLUMNS:
        cols = col_start + tl.arange(0, BLOCK_N)
        scores = tl.where((cols < n_keys)[None, :], scores, float("-inf"))
    if MAY_KEEP_MAX:
        if not keep_max:
            m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale_log2)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc_out = acc_out * alpha[:, None]
            if HAS_TANGENT:
                r_i = r_i * alpha
                acc_tangent = acc_tangent * alpha[:, None]
            m_i = m_new
        # The softmax runs in base 2 with s·log2(e) folded into one multiply-add per score.
        p = tl.math.exp2(scores * qk_scale_log2 - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        p_low = p.to(v.dtype)
        acc_out = tl.dot(p_low, v, acc_out)
        if HAS_TANGENT:
            # Masked key rows were loaded as zeros, so Ṡ stays finite there and p = 0 removes them.
            weighted = p * score_dot if TANGENTS_PRESCALED else p * (score_dot * scale)
            r_i = r_i + tl.sum(weighted, 1)
            acc_tangent = tl.dot(p_low, v_dot, acc_tangent)
            acc_tangent = tl.dot(weighted.to(v.dtype), v, acc_tangent)
    else:
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale_log2)
        p = tl.math.exp2(scores * qk_scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_low = p.to(v.dtype)
        acc_out = tl.dot(p_low, v, acc_out * alpha[:, None])
        if HAS_TANGENT:
            weighted = p * score_dot if TANGENTS_PRESCALED else p * (score_dot * scale)
            r_i = r_i * alpha + tl.sum(weighted, 1)
            acc_tangent = tl.dot(p_low, v_dot, acc_tangent * alpha[:, None])
            acc_tangent = tl.dot(weighted.to(v.dtype), v, acc_tangent)
        m_i = m_new
    return m_i, l_i, r_i, acc_out, acc_tangent


@triton.jit
def _attention_jvp_forward_kernel(
    q_ptr, k_ptr, v_ptr, q_dot_ptr, k_dot_ptr, v_dot_ptr,
    out_ptr, out_dot_ptr, lse_ptr, q_norm_ptr, k_norm_max_ptr,
    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
    s_qdb, s_qdn, s_qdh, s_kdb, s_kdn, s_kdh, s_vdb, s_vdn, s_vdh,
    s_ob, s_on, s_oh, s_odb, s_odn, s_odh,
    n_heads, n_queries, n_keys, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TANGENT: tl.constexpr, USE_TMA: tl.constexpr, TRY_FIXED_MAX: tl.constexpr,
    TANGENTS_PRESCALED: tl.constexpr,
):
    """Grid (query blocks, B·H): O, Ȯ (if HAS_TANGENT) and LSE for one query block of one head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    row_start = pid_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    dims = tl.arange(0, HEAD_DIM)
    qk_scale_log2 = scale * 1.4426950408889634

    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    q_dot_base = q_dot_ptr + b * s_qdb + h * s_qdh
    k_dot_base = k_dot_ptr + b * s_kdb + h * s_kdh
    v_dot_base = v_dot_ptr + b * s_vdb + h * s_vdh

    if USE_TMA:
        # One 2-D descriptor per (batch, head) over [N, D]: the copy engine zero-fills rows past
        # N, so tails need no load masks and heads never bleed into each other.
        q_desc = tl.make_tensor_descriptor(q_base, [n_queries, HEAD_DIM], [s_qn, 1], [BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_base, [n_keys, HEAD_DIM], [s_kn, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [n_keys, HEAD_DIM], [s_vn, 1], [BLOCK_N, HEAD_DIM])
        q = q_desc.load([row_start, 0])
        if HAS_TANGENT:
            q_dot_desc = tl.make_tensor_descriptor(q_dot_base, [n_queries, HEAD_DIM], [s_qdn, 1], [BLOCK_M, HEAD_DIM])
            k_dot_desc = tl.make_tensor_descriptor(k_dot_base, [n_keys, HEAD_DIM], [s_kdn, 1], [BLOCK_N, HEAD_DIM])
            v_dot_desc = tl.make_tensor_descriptor(v_dot_base, [n_keys, HEAD_DIM], [s_vdn, 1], [BLOCK_N, HEAD_DIM])
            q_dot = q_dot_desc.load([row_start, 0])
        else:
            k_dot_desc = k_desc
            v_dot_desc = v_desc
            q_dot = q
    else:
        k_desc = k_base
        v_desc = v_base
        k_dot_desc = k_dot_base
        v_dot_desc = v_dot_base
        q = tl.load(q_base + rows[:, None] * s_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_TANGENT:
            q_dot = tl.load(q_dot_base + rows[:, None] * s_qdn + dims[None, :], mask=row_ok[:, None], other=0.0)
        else:
            q_dot = q

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_out = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_tangent = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (n_keys // BLOCK_N) * BLOCK_N
    keep_max = n_full < 0
    loop_start = n_full * 0
    if TRY_FIXED_MAX:
        if n_full > 0:
            # The first block sets each row's running max m. By Cauchy-Schwarz no later score
            # exceeds bound = s·log2(e)·|q_i|·max_j|k_j|; if bound − m < 64 on every row of this
            # block, p = 2^(s − m) stays below 2^64 for every key, so m can stay fixed.
            k, k_dot, v, v_dot = _load_key_block(
                k_desc, v_desc, k_dot_desc, v_dot_desc, k_base, v_base, k_dot_base, v_dot_base,
                s_kn, s_vn, s_kdn, s_vdn, 0, n_keys, HEAD_DIM, BLOCK_N, HAS_TANGENT, USE_TMA, False)
            m_i, l_i, r_i, acc_out, acc_tangent = _online_jvp_step(
                q, q_dot, k, k_dot, v, v_dot, m_i, l_i, r_i, acc_out, acc_tangent,
                qk_scale_log2, scale, 0, n_keys, keep_max, HAS_TANGENT, False, BLOCK_N, False, TANGENTS_PRESCALED)
            loop_start = n_full * 0 + BLOCK_N
            q_norm = tl.load(q_norm_ptr + pid_bh.to(tl.int64) * n_queries + rows, mask=row_ok, other=0.0)
            bound = qk_scale_log2 * q_norm * tl.load(k_norm_max_ptr + pid_bh)
            keep_max = tl.max(bound - m_i, 0) < 64.0
    for col_start in range(loop_start, n_full, BLOCK_N):
        k, k_dot, v, v_dot = _load_key_block(
            k_desc, v_desc, k_dot_desc, v_dot_desc, k_base, v_base, k_dot_base, v_dot_base,
            s_kn, s_vn, s_kdn, s_vdn, col_start, n_keys, HEAD_DIM, BLOCK_N, HAS_TANGENT, USE_TMA, False)
        m_i, l_i, r_i, acc_out, acc_tangent = _online_jvp_step(
            q, q_dot, k, k_dot, v, v_dot, m_i, l_i, r_i, acc_out, acc_tangent,
            qk_scale_log2, scale, col_start, n_keys, keep_max, HAS_TANGENT, False, BLOCK_N, TRY_FIXED_MAX, TANGENTS_PRESCALED)

    if n_full < n_keys:
        # Tail block: only here do the scores pay for a column mask (and a max update).
        k, k_dot, v, v_dot = _load_key_block(
            k_desc, v_desc, k_dot_desc, v_dot_desc, k_base, v_base, k_dot_base, v_dot_base,
            s_kn, s_vn, s_kdn, s_vdn, n_full, n_keys, HEAD_DIM, BLOCK_N, HAS_TANGENT, USE_TMA, True)
        m_i, l_i, r_i, acc_out, acc_tangent = _online_jvp_step(
            q, q_dot, k, k_dot, v, v_dot, m_i, l_i, r_i, acc_out, acc_tangent,
            qk_scale_log2, scale, n_full, n_keys, keep_max, HAS_TANGENT, True, BLOCK_N, False, TANGENTS_PRESCALED)

    inv_l = 1.0 / l_i
    out = acc_out * inv_l[:, None]
    out_rows = out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_on + dims[None, :]
    tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if HAS_TANGENT:
        out_dot = acc_tangent * inv_l[:, None] - (r_i * inv_l)[:, None] * out
        out_dot_rows = out_dot_ptr + b * s_odb + h * s_odh + rows[:, None] * s_odn + dims[None, :]
        tl.store(out_dot_rows, out_dot.to(out_dot_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid_bh.to(tl.int64) * n_queries + rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and schedule of one forward launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool
    fixed_max: bool = True  # bf16/fp32 only: skip rescaling once the first block bounds every score
    prescale_tangents: bool = False  # pass scale·Q̇, scale·K̇ (one copy each) to save a multiply per score


# Chosen from bench/attention_jvp.py sweeps on an H100 with triton 3.6 (docs/attention_jvp_notes.md);
# keyed by (head_dim, has_tangent). With the tangent, one warpgroup per 64 query rows and three
# stages of K, K̇, V, V̇ tiles beat two lock-stepped warpgroups per 128 rows; pre-scaled tangents
# paid off at head_dim 128 (596 against 561 TFLOP/s) and not at 64.
DEFAULT_CONFIGS = {
    (128, True): KernelConfig(64, 64, 4, 3, True, prescale_tangents=True),
    (128, False): KernelConfig(128, 64, 8, 3, True, fixed_max=False),
    (64, True): KernelConfig(64, 64, 4, 3, True),
    (64, False): KernelConfig(128, 64, 8, 3, True, fixed_max=False),
}
INTERPRETER_CONFIG = KernelConfig(32, 16, 4, 1, False)



def _allocate_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_triton_allocator() -> None:
    """Give Triton a torch-backed scratch allocator (in-kernel TMA descriptors live there).

    Triton keeps the allocator in a context variable, which autograd's backward thread does not
    inherit (a checkpointed block recomputes its forward there), so it is set on every launch.
    """
    triton.set_allocator(_allocate_scratch)


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """The copy engine needs 16-byte aligned base addresses and row strides."""
    for t in tensors:
        item = t.element_size()
        if t.data_ptr() % 16 or any((s * item) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _check_inputs(q, k, v, q_dot=None, k_dot=None, v_dot=None) -> None:
    """Raise one clear ValueError for any input this kernel cannot take."""
    names = ("q", "k", "v", "q_dot", "k_dot", "v_dot")
    tensors = [t for t in (q, k, v, q_dot, k_dot, v_dot)]
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"triton attention JVP: {name} must be a 4-D tensor (B, N, H, D), got "
                             f"{getattr(t, 'shape', type(t))}")
    batch, n_queries, n_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (n_heads, head_dim):
        raise ValueError(f"triton attention JVP: k and v must be (B={batch}, Nk, H={n_heads}, D={head_dim}) "
                         f"like q {tuple(q.shape)}, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    for name, primal, tangent in zip(names[3:], (q, k, v), (q_dot, k_dot, v_dot)):
        if tangent is not None and tangent.shape != primal.shape:
            raise ValueError(f"triton attention JVP: {name} has shape {tuple(tangent.shape)}, "
                             f"its primal has {tuple(primal.shape)}; they must match")
    if n_queries == 0 or k.shape[1] == 0:
        raise ValueError(f"triton attention JVP: empty sequence (q {tuple(q.shape)}, k {tuple(k.shape)}); "
                         "attention needs at least one query and one key")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton attention JVP: head_dim {head_dim} is not supported; use one of "
                         f"{SUPPORTED_HEAD_DIMS} or the math backend")
    interpreting = is_interpreter_enabled()
    allowed = GPU_DTYPES + ((torch.float32,) if interpreting else ())
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise ValueError(f"triton attention JVP: {name} is {t.dtype} but q is {q.dtype}; "
                             "all inputs and tangents must share one dtype")
        if t.dtype not in allowed:
            raise ValueError(f"triton attention JVP: dtype {t.dtype} is not supported; use "
                             f"{' or '.join(str(d) for d in allowed)}")
        if t.stride(-1) != 1:
            raise ValueError(f"triton attention JVP: {name} has stride {t.stride()}; the head_dim "
                             "axis must be contiguous (stride 1). Call .contiguous() on it first")
        if t.device != q.device:
            raise ValueError(f"triton attention JVP: {name} is on {t.device} but q is on {q.device}")
        if max(t.shape[1] * t.stride(1), 1) >= 2**31:
            raise ValueError(f"triton attention JVP: {name} spans more than 2^31 elements within one "
                             "batch entry; split the sequence")
    if not interpreting and q.device.type != "cuda":
        raise ValueError("triton attention JVP: tensors must be on a CUDA device (or set "
                         "TRITON_INTERPRET=1 before importing triton to test on CPU in float32)")


def _resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim) unless given; must be a positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not scale > 0.0 or not math.isfinite(scale):
        raise ValueError(f"triton attention JVP: scale must be a positive finite number, got {scale}")
    return scale


def _forward(q, k, v, q_dot=None, k_dot=None, v_dot=None, scale=None, *, config: KernelConfig | None = None,
             out=None, out_dot=None, lse=None, launch_info: dict | None = None):
    """Launch the forward kernel; returns (out, out_dot or None, lse (B, H, Nq) float32).

    `config` overrides the tile table (benchmarks, tests); `out`, `out_dot`, `lse` let tests pass
    poisoned buffers to check that every element is written; `launch_info` receives the compiled
    kernel (registers, spills) for benchmarks. With `config.prescale_tangents` the kernel reads
    scale·Q̇ and scale·K̇ (two small copies) and forms P̃⊙Ṡ with one multiply per score.
    """
    has_tangent = q_dot is not None
    if has_tangent and (k_dot is None or v_dot is None):
        raise ValueError("triton attention JVP: give all three tangents q_dot, k_dot, v_dot or none")
    _check_inputs(q, k, v, q_dot, k_dot, v_dot)
    batch, n_queries, n_heads, head_dim = q.shape
    n_keys = k.shape[1]
    scale = _resolve_scale(scale, head_dim)
    if config is None:
        config = INTERPRETER_CONFIG if is_interpreter_enabled() else DEFAULT_CONFIGS[(head_dim, has_tangent)]
    all_inputs = (q, k, v, q_dot, k_dot, v_dot) if has_tangent else (q, k, v)
    use_tma = config.use_tma and _tma_compatible(*all_inputs)
    if use_tma and not is_interpreter_enabled():
        _install_triton_allocator()

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if has_tangent and out_dot is None:
        out_dot = torch.empty_like(out)
    if lse is None:
        lse = torch.empty((batch, n_heads, n_queries), device=q.device, dtype=torch.float32)
    if not has_tangent:
        q_dot, k_dot, v_dot, out_dot_arg = q, k, v, out
    else:
        out_dot_arg = out_dot
    try_fixed_max = config.fixed_max and q.dtype in (torch.bfloat16, torch.float32)
    if try_fixed_max:
        # Row norms of q and the largest key norm per head bound every score (see the kernel).
        q_norm = torch.linalg.vector_norm(q, dim=-1, dtype=torch.float32).transpose(1, 2).contiguous()
        k_norm_max = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).amax(dim=1).contiguous()
    else:
        q_norm = k_norm_max = lse

    prescaled = has_tangent and config.prescale_tangents
    if prescaled:
        q_dot, k_dot = q_dot * scale, k_dot * scale

    grid = (triton.cdiv(n_queries, config.block_m), batch * n_heads)
    compiled = _attention_jvp_forward_kernel[grid](
        q, k, v, q_dot, k_dot, v_dot, out, out_dot_arg, lse, q_norm, k_norm_max,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_dot.stride(0), q_dot.stride(1), q_dot.stride(2), k_dot.stride(0), k_dot.stride(1), k_dot.stride(2),
        v_dot.stride(0), v_dot.stride(1), v_dot.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        out_dot_arg.stride(0), out_dot_arg.stride(1), out_dot_arg.stride(2),
        n_heads, n_queries, n_keys, scale,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HAS_TANGENT=has_tangent, USE_TMA=use_tma, TRY_FIXED_MAX=try_fixed_max, TANGENTS_PRESCALED=prescaled,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if launch_info is not None:
        launch_info.update(kernel=compiled, use_tma=use_tma, config=config)
    return out, (out_dot if has_tangent else None), lse


@torch.library.custom_op("rcm::triton_attention_jvp_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_dot: torch.Tensor | None, k_dot: torch.Tensor | None, v_dot: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward as a torch op, so functorch transforms and torch.compile see one opaque call.

    Without tangents the second output is an empty tensor.
    """
    out, out_dot, lse = _forward(q, k, v, q_dot, k_dot, v_dot, scale)
    return out, (out.new_empty(0) if out_dot is None else out_dot), lse


@_forward_op.register_fake
def _forward_op_fake(q, k, v, q_dot, k_dot, v_dot, scale):
    """Shapes and dtypes of the forward's outputs, for tracing."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    out_dot = torch.empty_like(out) if q_dot is not None else out.new_empty(0)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, out_dot, lse


# --------------------------------------------------------------------------------------------
# Backward of the primal
# --------------------------------------------------------------------------------------------

# "cudnn": cuDNN's SDPA backward fed our O and LSE (541 TFLOP/s on (1,12,32760,128), H100);
# "flash": aten's FlashAttention-2 backward fed the same (315 TFLOP/s, SDPA's own flash speed);
# "recompute": SDPA math under autograd (CPU / fallback). cuDNN falls back to flash if it refuses.
BACKWARD_BACKENDS = ("cudnn", "flash", "recompute")
backward_backend = "cudnn"


def _backward_flash(grad_out, q, k, v, out, lse, scale):
    """dQ, dK, dV from aten._flash_attention_backward, which takes (B, N, H, D) directly."""
    grads = torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, None, None, q.shape[1], k.shape[1], 0.0, False, None, None,
        scale=scale,
    )
    return grads[0], grads[1], grads[2]


def _backward_cudnn(grad_out, q, k, v, out, lse, scale):
    """dQ, dK, dV from cuDNN's SDPA backward (it wants (B, H, N, D) views and LSE as (B, H, Nq, 1))."""
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    offset = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse.unsqueeze(-1), seed, offset, None, None, None,
        q.shape[1], k.shape[1], 0.0, False, scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _backward_recompute(grad_out, q, k, v, out, lse, scale):
    """dQ, dK, dV by differentiating SDPA again (slow; for CPU and unsupported GPUs)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        recomputed = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in leaves), scale=scale).transpose(1, 2)
        return torch.autograd.grad(recomputed, leaves, grad_out)


def primal_backward(grad_out, q, k, v, out, lse, scale, backend: str | None = None):
    """dQ, dK, dV of O = softmax(s·QKᵀ)V in (B, N, H, D), given our saved O and LSE."""
    backend_was_chosen = backend is not None
    backend = backend or backward_backend
    if backend not in BACKWARD_BACKENDS:
        raise ValueError(f"unknown attention backward backend {backend!r}; use one of {BACKWARD_BACKENDS}")
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if q.device.type != "cuda" or backend == "recompute":
        return _backward_recompute(grad_out, q, k, v, out, lse, scale)
    if backend == "cudnn":
        try:
            return _backward_cudnn(grad_out, q, k, v, out, lse, scale)
        except RuntimeError:
            if backend_was_chosen:
                raise
            # cuDNN missing or refusing this shape: the flash backward takes the same inputs.
    return _backward_flash(grad_out, q, k, v, out, lse, scale)


# --------------------------------------------------------------------------------------------
# autograd.Functions and the public functions
# --------------------------------------------------------------------------------------------


class TritonAttentionWithTangent(torch.autograd.Function):
    """(q, k, v, q_dot, k_dot, v_dot) -> (out, out_dot) in one fused pass; gradients reach q, k, v through out only."""

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, scale):
        """Run the fused kernel: O, Ȯ and the log-sum-exp."""
        _check_inputs(q, k, v, q_dot, k_dot, v_dot)
        return _forward_op(q, k, v, q_dot, k_dot, v_dot, _resolve_scale(scale, q.shape[-1]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Keep what the flash backward needs: inputs, O and LSE."""
        q, k, v, _, _, _, scale = inputs
        out, out_dot, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = _resolve_scale(scale, q.shape[-1])
        ctx.mark_non_differentiable(out_dot, lse)

    @staticmethod
    def backward(ctx, grad_out, grad_out_dot, grad_lse):
        """Gradients through O only (rcm_spec §6): the tangent output is treated as detached."""
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = primal_backward(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None, None, None, None


class TritonAttention(torch.autograd.Function):
    """Plain attention (q, k, v) -> (out, lse) with a Triton forward, flash backward and a fused `jvp` rule."""

    @staticmethod
    def forward(q, k, v, scale):
        """Primal-only pass of the same kernel: O and the log-sum-exp."""
        _check_inputs(q, k, v)
        out, _, lse = _forward_op(q, k, v, None, None, None, _resolve_scale(scale, q.shape[-1]))
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Save for the backward and for forward-mode AD (torch.func.jvp, forward_ad)."""
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)
        ctx.scale = _resolve_scale(scale, q.shape[-1])
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        """dQ, dK, dV through O."""
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = primal_backward(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, scale_dot):
        """Ȯ from the fused kernel (missing tangents count as zero); the LSE gets no tangent."""
        q, k, v = ctx.saved_tensors
        q_dot = torch.zeros_like(q) if q_dot is None else q_dot
        k_dot = torch.zeros_like(k) if k_dot is None else k_dot
        v_dot = torch.zeros_like(v) if v_dot is None else v_dot
        _check_inputs(q, k, v, q_dot, k_dot, v_dot)
        _, out_dot, _ = _forward_op(q, k, v, q_dot, k_dot, v_dot, ctx.scale)
        return out_dot, None


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale=None):
    """Attention and its tangent in one pass: (B, N, H, D) inputs -> (out, out_dot), both (B, Nq, H, D)."""
    out, out_dot, _ = TritonAttentionWithTangent.apply(q, k, v, q_dot, k_dot, v_dot, scale)
    return out, out_dot


def attention(q, k, v, scale=None):
    """softmax(scale·QKᵀ)V for (B, N, H, D) inputs; differentiable in reverse and forward mode."""
    out, _ = TritonAttention.apply(q, k, v, scale)
    return out
