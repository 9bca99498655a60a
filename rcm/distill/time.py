"""Time conventions shared by every loss and sampler.

TrigFlow time ``t ∈ [0, π/2]`` (``x_t = cos t·x0 + sin t·ε``), rectified-flow time ``s ∈ [0, 1]``
(``x_s = (1−s)·x0 + s·ε``) and the noise level ``σ = tan t = s/(1−s)``. All conversions run in
float64: the coefficients near t = π/2 lose digits in lower precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HALF_PI = math.pi / 2


def rf_to_sigma(s: torch.Tensor, max_s: float = 1.0 - 1e-7) -> torch.Tensor:
    """σ = s/(1−s), with s clamped below 1 so σ stays finite."""
    s = s.double().clamp(max=max_s)
    return s / (1 - s)


def sigma_to_rf(sigma: torch.Tensor) -> torch.Tensor:
    """s = σ/(1+σ)."""
    sigma = sigma.double()
    return sigma / (1 + sigma)


def sigma_to_trig(sigma: torch.Tensor) -> torch.Tensor:
    """t = arctan σ."""
    return torch.atan(sigma.double())


def trig_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """σ = tan t."""
    return torch.tan(t.double())


def rf_to_trig(s: torch.Tensor) -> torch.Tensor:
    """t = arctan(s/(1−s)), computed as atan2 so that s = 1 maps exactly to π/2."""
    s = s.double()
    return torch.atan2(s, 1 - s)


def trig_to_rf(t: torch.Tensor) -> torch.Tensor:
    """s = sin t/(cos t + sin t)."""
    t = t.double()
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


@dataclass
class TimeSamplerConfig:
    """A distribution over RF time: ``lognormal`` (log σ ~ N(p_mean, p_std²)) or ``uniform_shift``."""

    kind: str = "lognormal"
    p_mean: float = 0.7
    p_std: float = 1.6
    shift: float = 5.0

    def __post_init__(self):
        if self.kind not in ("lognormal", "uniform_shift"):
            raise ValueError(f"time sampler kind must be 'lognormal' or 'uniform_shift', got '{self.kind}'")
        if self.p_std <= 0 or self.shift <= 0:
            raise ValueError("time sampler p_std and shift must be positive")


def as_time_sampler_config(node) -> TimeSamplerConfig:
    """A TimeSamplerConfig from itself or from a config node with the same fields (validated)."""
    if isinstance(node, TimeSamplerConfig):
        return node
    return TimeSamplerConfig(kind=node.kind, p_mean=node.p_mean, p_std=node.p_std, shift=node.shift)


def shift_rf_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: s = shift·u / (1 + (shift−1)·u); shift > 1 moves mass to high noise."""
    u = u.double()
    return shift * u / (1 + (shift - 1) * u)


def sample_rf_time(
    config: TimeSamplerConfig, n: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Draw n RF times s ∈ (0, 1) (float64) from the configured sampler."""
    kind = config.kind
    if kind == "lognormal":
        log_sigma = config.p_mean + config.p_std * torch.randn(
            n, generator=generator, device=device, dtype=torch.float64
        )
        return sigma_to_rf(log_sigma.exp())
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return shift_rf_time(u, config.shift)


def sample_trig_time(
    config: TimeSamplerConfig, n: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Draw n TrigFlow times t ∈ (0, π/2) (float64) from the configured RF-time sampler."""
    return rf_to_trig(sample_rf_time(config, n, generator, device))
