"""TrigFlow view of a flow-matching network (Wan's ``v(x_s, 1000·s, text) = ε − x0``).

Every network here (teacher, student, fake score) is the same flow-matching DiT; this module turns it
into a TrigFlow denoiser. With ``c = 1/(cos t + sin t)``: the network sees ``c·x_t`` (which equals
``x_s``) at timestep ``1000·sin t·c`` (= 1000·s), and ``x0̂ = c·x_t − (sin t·c)·out``. The velocity
is ``F = (cos t·x_t − x0̂)/sin t``. Coefficients are computed in float64, and every step is plain
differentiable arithmetic so forward-mode AD passes through the preconditioning too.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

# (x_BCTHW, timestep_B, context_BLD) -> velocity_BCTHW
FlowNetwork = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TrigFlowCoefficients(NamedTuple):
    """Preconditioning coefficients per sample (float64, shape (B,))."""

    c_in: torch.Tensor
    c_noise: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor


def trigflow_coefficients(t: torch.Tensor) -> TrigFlowCoefficients:
    """c_in = c, c_noise = 1000·sin t·c, c_skip = c, c_out = −sin t·c, with c = 1/(cos t + sin t)."""
    t = t.double()
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    c = 1 / (cos_t + sin_t)
    return TrigFlowCoefficients(c_in=c, c_noise=1000 * sin_t * c, c_skip=c, c_out=-sin_t * c)


def per_sample(coefficient_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) coefficient (or boolean mask) to broadcast over a (B, ...) tensor, in that tensor's dtype."""
    if coefficient_B.dtype != torch.bool:
        coefficient_B = coefficient_B.to(like.dtype)
    return coefficient_B.reshape(-1, *([1] * (like.dim() - 1)))


def denoise(network: FlowNetwork, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """TrigFlow x0 prediction of a flow-matching network at (x_t, t)."""
    coefficients = trigflow_coefficients(t)
    # The time embedding is computed in float32 (float64 for float64 inputs), as Wan does.
    timestep_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    out = network(per_sample(coefficients.c_in, x_t) * x_t, coefficients.c_noise.to(timestep_dtype), context)
    return per_sample(coefficients.c_skip, x_t) * x_t + per_sample(coefficients.c_out, x_t) * out.to(x_t.dtype)


def velocity_from_x0(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """TrigFlow velocity F = (cos t·x_t − x0̂)/sin t (undefined at t = 0)."""
    t = t.double()
    return (per_sample(torch.cos(t), x_t) * x_t - x0) / per_sample(torch.sin(t), x_t)


def velocity(network: FlowNetwork, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """TrigFlow velocity F(x_t, t) of a flow-matching network."""
    return velocity_from_x0(x_t, t, denoise(network, x_t, t, context))


def noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos t·x0 + sin t·ε."""
    t = t.double()
    return per_sample(torch.cos(t), x0) * x0 + per_sample(torch.sin(t), x0) * noise


def check_guidance_scale(guidance_scale: float, key: str = "guidance scale") -> None:
    """A CFG scale must be a finite number ≥ 0 (≤ 1 means no guidance: the conditional prediction alone)."""
    if not (guidance_scale >= 0 and guidance_scale != float("inf")):
        raise ValueError(f"{key} must be a finite number at least 0 (1 or less: no guidance), got {guidance_scale}")


def uses_guidance(guidance_scale: float) -> bool:
    """Whether CFG runs the unconditional branch: only for scales above 1 (rcm_spec.md §4)."""
    return guidance_scale > 1.0


def guided_denoise(
    network: FlowNetwork,
    x_t: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free-guided x0: x0_u + w·(x0_c − x0_u), both branches in one batched forward.

    ``negative_context`` is the embedding of the negative prompt, (L, D) or (B, L, D). A scale w ≤ 1 skips
    the unconditional pass and returns the conditional x0 (the reference recipe's "no CFG").
    Guidance on x0 and on the velocity is the same combination, since F is affine in x0.
    """
    if not uses_guidance(guidance_scale):
        return denoise(network, x_t, t, context)
    batch = x_t.shape[0]
    if negative_context.dim() == 2:
        negative_context = negative_context.unsqueeze(0).expand(batch, -1, -1)
    length = max(context.shape[1], negative_context.shape[1])
    both_contexts = torch.cat([pad_tokens(context, length), pad_tokens(negative_context, length)], dim=0)
    x0_cond, x0_uncond = denoise(network, torch.cat([x_t, x_t]), torch.cat([t, t]), both_contexts).chunk(2)
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


def pad_tokens(context_BLD: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad a text embedding along its token axis (Wan pads every prompt the same way)."""
    missing = length - context_BLD.shape[1]
    if missing == 0:
        return context_BLD
    return torch.nn.functional.pad(context_BLD, (0, 0, 0, missing))
