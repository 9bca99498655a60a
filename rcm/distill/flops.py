"""Model FLOPs of the Wan DiT and of one rCM student step, for MFU in the benchmarks.

Only the matmuls count (linear layers and attention's two products); norms, modulation, RoPE and the text
and time embeddings (a few per mille at 480p) do not, nor does recomputation under activation checkpointing,
so MFU compares steps that checkpoint differently on the same footing.
"""
from __future__ import annotations

from dataclasses import dataclass

from rcm.distill.schedule import num_simulation_steps
from rcm.models.wan_dit import WanDiTConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring: the MFU denominator.
BF16_DENSE_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class ForwardFlops:
    """One forward of one sample: the linear layers' and attention's matmul FLOPs."""

    linear: float
    attention: float


def patch_embedding_flops(config: WanDiTConfig, tokens: int) -> float:
    """The patch embedding's matmul FLOPs in one forward (the head's are the same)."""
    patch = config.in_channels * config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    return 2 * tokens * patch * config.dim


def wan_dit_forward_flops(config: WanDiTConfig, tokens: int, text_tokens: int) -> ForwardFlops:
    """Matmul FLOPs of one Wan DiT forward over ``tokens`` video tokens and ``text_tokens`` text tokens."""
    dim, ffn = config.dim, config.ffn_dim
    per_token = 2 * 4 * dim * dim + 2 * 2 * dim * dim + 2 * 2 * dim * ffn  # self q k v o, cross q o, FFN
    per_text_token = 2 * 2 * dim * dim  # cross-attention k, v
    embed_head = 2 * patch_embedding_flops(config, tokens)  # patch embedding in, head out (same size)
    # QKᵀ and PV: 2·N·M·dim each; self-attention over N×N, cross-attention over N×text.
    attention = 4 * tokens * tokens * dim + 4 * tokens * text_tokens * dim
    return ForwardFlops(config.num_layers * (tokens * per_token + text_tokens * per_text_token) + embed_head,
                        config.num_layers * attention)


# Cost of each pass in forward-equivalents. The tangent of a linear layer is one more matmul; the fused Triton
# kernel's attention tangent costs twice its forward (3× in all, with the text keys' zero tangents too).
# Backward: 2× for linear layers, 2.5× for attention (FlashAttention recomputes QKᵀ).
TANGENT = ForwardFlops(linear=1.0, attention=2.0)
BACKWARD = ForwardFlops(linear=2.0, attention=2.5)


def rcm_student_step_flops(config: WanDiTConfig, tokens: int, text_tokens: int, student_iteration: int = 0,
                           tangent: ForwardFlops = TANGENT, backward: ForwardFlops = BACKWARD) -> ForwardFlops:
    """Model FLOPs of one rCM student step for one sample (what ``Distiller.loss`` runs after the warm-up):

    - sCM: teacher with CFG (2 forwards, no grad), the student's forward with tangent and its backward;
    - DMD: backward simulation (k − 1 student forwards without grad, the last with grad and backward),
      the fake score (1 forward, no grad), the teacher with CFG on the noised sample (2 forwards).
    ``tangent`` and ``backward`` give each pass's cost in forwards (the defaults: our kernels on a GPU).
    """
    forward = wan_dit_forward_flops(config, tokens, text_tokens)
    k = num_simulation_steps(student_iteration)

    def passes(part: str) -> float:
        scm = 2 + (1 + getattr(tangent, part) + getattr(backward, part))
        dmd = (k - 1) + (1 + getattr(backward, part)) + 1 + 2
        return scm + dmd

    # Neither backward computes the gradient of the input latents: one patch-embedding matmul fewer in each.
    no_input_grad = 2 * patch_embedding_flops(config, tokens)
    return ForwardFlops(passes("linear") * forward.linear - no_input_grad, passes("attention") * forward.attention)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name, or None when it is not in ``BF16_DENSE_PEAK``."""
    return next((peak for key, peak in BF16_DENSE_PEAK.items() if key in device_name), None)


__all__ = ["BF16_DENSE_PEAK", "ForwardFlops", "bf16_peak_flops", "patch_embedding_flops", "rcm_student_step_flops", "wan_dit_forward_flops"]
