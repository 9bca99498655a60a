"""Torch references for the Triton JVP attention: the exact closed form and a block-by-block emulation.

Both take the model's (B, N, H, D) layout. `attention_jvp_reference` is the ground truth the tests
compare against (float64 by default). `attention_jvp_blockwise` replays the kernel's algorithm
(online base-2 softmax, one tangent accumulator, low-precision P and P⊙Ṡ fed to the PV products)
in torch, so a kernel result can be checked against the same algorithm where the Triton
interpreter cannot run, and so the algorithm itself is tested apart from Triton.
"""
from __future__ import annotations

import math

import torch


def attention_jvp_reference(q, k, v, q_dot, k_dot, v_dot, scale=None, dtype=torch.float64):
    """(out, out_dot, lse) by rcm_spec §6 in `dtype`; out/out_dot (B, Nq, H, D), lse (B, H, Nq)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v, q_dot, k_dot, v_dot = (t.to(dtype).transpose(1, 2) for t in (q, k, v, q_dot, k_dot, v_dot))
    scores = scale * q @ k.transpose(-1, -2)
    probs = torch.softmax(scores, dim=-1)
    score_dot = scale * (q_dot @ k.transpose(-1, -2) + q @ k_dot.transpose(-1, -2))
    out = probs @ v
    weighted = probs * score_dot
    out_dot = probs @ v_dot + weighted @ v - weighted.sum(-1, keepdim=True) * out
    lse = torch.logsumexp(scores, dim=-1)
    return out.transpose(1, 2), out_dot.transpose(1, 2), lse


def attention_jvp_blockwise(q, k, v, q_dot, k_dot, v_dot, scale=None, block_m=128, block_n=64):
    """(out, out_dot, lse) by the kernel's block algorithm in float32, rounding P like the kernel."""
    low = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qk_scale_log2 = scale * 1.4426950408889634
    q, k, v, q_dot, k_dot, v_dot = (t.transpose(1, 2) for t in (q, k, v, q_dot, k_dot, v_dot))
    batch, heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    out = torch.empty(batch, heads, n_queries, head_dim, dtype=low, device=q.device)
    out_dot = torch.empty_like(out)
    lse = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=q.device)

    def mm(a, b):
        return torch.matmul(a.float(), b.float())

    for row in range(0, n_queries, block_m):
        rows = slice(row, min(row + block_m, n_queries))
        q_blk, q_dot_blk = q[:, :, rows], q_dot[:, :, rows]
        m_i = torch.full(q_blk.shape[:-1], float("-inf"), device=q.device)
        l_i = torch.zeros_like(m_i)
        r_i = torch.zeros_like(m_i)
        acc_out = torch.zeros(*q_blk.shape[:-1], head_dim, device=q.device)
        acc_tangent = torch.zeros_like(acc_out)
        for col in range(0, n_keys, block_n):
            cols = slice(col, min(col + block_n, n_keys))
            k_blk, v_blk, k_dot_blk, v_dot_blk = k[:, :, cols], v[:, :, cols], k_dot[:, :, cols], v_dot[:, :, cols]
            scores = mm(q_blk, k_blk.transpose(-1, -2))
            m_new = torch.maximum(m_i, scores.amax(-1) * qk_scale_log2)
            p = torch.exp2(scores * qk_scale_log2 - m_new[..., None])
            alpha = torch.exp2(m_i - m_new)
            l_i = l_i * alpha + p.sum(-1)
            score_dot = mm(q_dot_blk, k_blk.transpose(-1, -2)) + mm(q_blk, k_dot_blk.transpose(-1, -2))
            weighted = p * (score_dot * scale)
            r_i = r_i * alpha + weighted.sum(-1)
            p_low = p.to(low)
            acc_out = acc_out * alpha[..., None] + mm(p_low, v_blk)
            acc_tangent = acc_tangent * alpha[..., None] + mm(p_low, v_dot_blk) + mm(weighted.to(low), v_blk)
            m_i = m_new
        block_out = acc_out / l_i[..., None]
        out[:, :, rows] = block_out.to(low)
        out_dot[:, :, rows] = (acc_tangent / l_i[..., None] - (r_i / l_i)[..., None] * block_out).to(low)
        lse[:, :, rows] = (m_i + torch.log2(l_i)) * 0.6931471805599453
    return out.transpose(1, 2), out_dot.transpose(1, 2), lse
