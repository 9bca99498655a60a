"""Power-function EMA of the student (Karras et al., EDM2), parameterized by σ_rel."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def power_ema_gamma(sigma_rel: float) -> float:
    """γ: the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + 12 − σ_rel⁻² = 0."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"ema sigma_rel must be in (0, 0.28) for a positive gamma, got {sigma_rel}")
    inverse_square = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return float(max(root.real for root in roots if abs(root.imag) < 1e-9))


def power_ema_beta(iteration: int, gamma: float) -> float:
    """β(it) = (1 − 1/(it+1))^(γ+1): 0 at the first update, so the EMA starts at the weights."""
    return (1.0 - 1.0 / (iteration + 1)) ** (gamma + 1)


class PowerEMA:
    """A float32 shadow copy of a model's parameters, keyed by the model's own parameter names."""

    def __init__(self, model: nn.Module, sigma_rel: float = 0.1):
        self.gamma = power_ema_gamma(sigma_rel)
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        """Blend the model's current parameters into the shadow copy."""
        weight = 1.0 - power_ema_beta(iteration, self.gamma)
        for name, parameter in model.named_parameters():
            self.shadow[name].lerp_(parameter.detach().float(), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into a model of the same structure."""
        for name, parameter in model.named_parameters():
            parameter.copy_(self.shadow[name].to(parameter.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors themselves, so a checkpoint load fills them in place."""
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved EMA weights in (names must match the model's)."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, value in state.items():
            if value is not self.shadow[name]:
                self.shadow[name].copy_(value)
