"""DMD: reverse-divergence score regularization and the fake-score (critic) loss (spec §3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rcm.distill.time import HALF_PI, TimeSamplerConfig, sample_trig_time
from rcm.distill.trigflow import per_sample

FIXED_INTERMEDIATE_TIMES = (1.5, 1.4, 1.0)

# (x_t, t, context) -> x0̂
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def backward_simulation_times(
    num_steps: int,
    batch: int,
    time_sampler: TimeSamplerConfig,
    fixed: bool,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Times (num_steps + 1, B), float64: π/2, intermediate times (random non-increasing or fixed), 0."""
    if num_steps < 1 or (fixed and num_steps > len(FIXED_INTERMEDIATE_TIMES) + 1):
        limit = f"1 to {len(FIXED_INTERMEDIATE_TIMES) + 1}" if fixed else "at least 1"
        raise ValueError(f"backward simulation takes {limit} steps{' with fixed times' if fixed else ''}, got {num_steps}")
    times = [torch.full((batch,), HALF_PI, dtype=torch.float64, device=device)]
    for i in range(num_steps - 1):
        if fixed:
            times.append(torch.full((batch,), FIXED_INTERMEDIATE_TIMES[i], dtype=torch.float64, device=device))
        else:
            times.append(torch.minimum(sample_trig_time(time_sampler, batch, generator, device), times[-1]))
    times.append(torch.zeros(batch, dtype=torch.float64, device=device))
    return torch.stack(times)


def backward_simulation(
    student: Denoiser,
    noise: torch.Tensor,
    times: torch.Tensor,
    context: torch.Tensor,
    fresh_noise: Callable[[], torch.Tensor],
    grad_last_step: bool = True,
) -> torch.Tensor:
    """Generate G from noise with the student along ``times``; only the last x0̂ may carry gradients."""
    x = noise
    num_steps = times.shape[0] - 1
    for i in range(num_steps):
        last = i == num_steps - 1
        with torch.set_grad_enabled(grad_last_step and last and torch.is_grad_enabled()):
            x0 = student(x, times[i], context)
        if last:
            return x0
        t_next = times[i + 1]
        x = per_sample(torch.cos(t_next), x0) * x0.detach() + per_sample(torch.sin(t_next), x0) * fresh_noise()
    raise AssertionError("unreachable")


@dataclass
class DMDOutput:
    """Loss (scalar, with gradient) and logs."""

    loss: torch.Tensor
    num_nonfinite: int


def dmd_loss(
    generated: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    loss_scale: float,
) -> DMDOutput:
    """L = Σ(G − sg(G − grad))² with grad = (x0_fake − x0_real)/mean|G − x0_real| (float64).

    ``fake_x0`` and ``real_x0`` are the fake score's and the teacher's (CFG) x0 at
    x_D = cos t_D·G + sin t_D·ε; both are treated as constants.
    """
    generated64 = generated.double()
    fake64, real64 = fake_x0.detach().double(), real_x0.detach().double()
    weight = (generated64.detach() - real64).abs().flatten(1).mean(1).clamp(min=1e-5)
    grad = (fake64 - real64) / per_sample(weight, generated64)
    finite = torch.isfinite(grad).flatten(1).all(1)
    num_nonfinite = int((~finite).sum())
    if num_nonfinite:
        grad = torch.where(per_sample(finite, grad), grad, 0.0)
    target = (generated64 - grad).detach()
    per_sample_loss = ((generated64 - target) ** 2).flatten(1).sum(1)
    per_sample_loss = torch.where(finite, per_sample_loss, 0.0)
    return DMDOutput(loss=loss_scale * per_sample_loss.mean(), num_nonfinite=num_nonfinite)


def fake_score_loss(generated: torch.Tensor, fake_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Critic loss Σ(G − fake_x0)²/sin²t_D per sample, averaged over the batch."""
    sin_t = per_sample(torch.sin(t.double()), fake_x0.double())
    per_sample_loss = (((generated.detach().double() - fake_x0.double()) / sin_t) ** 2).flatten(1).sum(1)
    return per_sample_loss.mean()
