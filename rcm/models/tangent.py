"""Tangents (forward-mode derivatives) of the DiT's layers, written out.

The sCM loss needs the network's output and its JVP along (ẋ, ṫ). Carrying the tangent next to the
primal through one forward — each layer returns (y, ẏ) — costs one forward instead of the reference's
separate JVP pass and gradient pass. Tangents are computed under `no_grad` from the primal
activations: gradients flow through the primal only, and no tangent activation is kept for backward.
Every function here takes the primal input and its tangent and returns the output's tangent.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@torch.no_grad()
def linear_tangent(weight: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    """d(Wx + b) = W·ẋ (the bias is constant)."""
    if torch.is_autocast_enabled(x_dot.device.type):  # autocast casts both; widening ẋ first would only copy it
        return F.linear(x_dot, weight)
    return F.linear(x_dot.to(weight.dtype), weight)


@torch.no_grad()
def layer_norm_tangent(
    x: torch.Tensor, x_dot: torch.Tensor, eps: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """d LayerNorm: ṅ = (ẋ − mean ẋ)/σ − n·mean(n·(ẋ − mean ẋ))/σ, then scaled by the weight."""
    centered_dot = x_dot - x_dot.mean(dim=-1, keepdim=True)
    centered = x - x.mean(dim=-1, keepdim=True)
    inverse_std = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    normalized = centered * inverse_std
    tangent = inverse_std * (centered_dot - normalized * (normalized * centered_dot).mean(dim=-1, keepdim=True))
    return tangent if weight is None else tangent * weight.to(tangent.dtype)


@torch.no_grad()
def rms_norm_tangent(x: torch.Tensor, x_dot: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """d(x·r·w) with r = (mean x² + eps)^(−1/2): w·r·(ẋ − x·r²·mean(x·ẋ))."""
    inverse_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    tangent = inverse_rms * (x_dot - x * inverse_rms.pow(2) * (x * x_dot).mean(dim=-1, keepdim=True))
    return tangent * weight.to(tangent.dtype)


@torch.no_grad()
def gelu_tanh_tangent(x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    """d GELU(tanh approximation) = [½(1 + tanh u) + ½x(1 − tanh²u)·u′]·ẋ, u = √(2/π)(x + 0.044715x³)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    tanh_u = torch.tanh(_SQRT_2_OVER_PI * (wide + 0.044715 * wide.pow(3)))
    derivative = 0.5 * (1 + tanh_u) + 0.5 * wide * (1 - tanh_u.pow(2)) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * wide.pow(2))
    return (derivative * x_dot.to(wide.dtype)).to(x_dot.dtype)


@torch.no_grad()
def silu_tangent(x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    """d(x·σ(x)) = σ(x)·(1 + x·(1 − σ(x)))·ẋ."""
    sigmoid = torch.sigmoid(x)
    return sigmoid * (1 + x * (1 - sigmoid)) * x_dot


@torch.no_grad()
def modulate_tangent(
    normalized: torch.Tensor, normalized_dot: torch.Tensor, scale: torch.Tensor, scale_dot: torch.Tensor, shift_dot: torch.Tensor
) -> torch.Tensor:
    """d(n·(1 + scale) + shift) = ṅ·(1 + scale) + n·scalė + shiḟt."""
    return normalized_dot * (1 + scale) + normalized * scale_dot + shift_dot
