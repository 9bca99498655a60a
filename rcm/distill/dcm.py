"""Discrete-time consistency (dCM), the JVP-free baseline (rcm_spec.md §2, last paragraph).

Times: ``u ~ U[0, 1 − m·Δ)`` drawn continuously, ``s_k = 1 − (u + k·Δ)`` for k = 0..m (Δ = 1/num_steps,
m the skipping interval), each shifted (``s ↦ shift·s/(1 + (shift−1)·s)``) and turned into TrigFlow time.
The CFG teacher walks from t_0 to t_m with Euler steps in TrigFlow time; the target is the student's own
x0̂ at the end of that walk.
"""
from __future__ import annotations

from typing import Callable

import torch

from rcm.distill.time import rf_to_trig, shift_rf_time
from rcm.distill.trigflow import per_sample, velocity_from_x0

# (x_t, t) -> the teacher's CFG x0̂
TeacherX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_skip_interval(skip_interval: int, num_steps: int, key: str = "distill.dcm_skip_interval") -> None:
    """m must leave room for a step: 1 ≤ m < num_steps."""
    if not 1 <= skip_interval < num_steps:
        raise ValueError(f"{key} must be at least 1 and below the {num_steps} dCM steps, got {skip_interval}")


def dcm_times(
    batch: int, num_steps: int, skip_interval: int, shift: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """TrigFlow times (skip_interval + 1, B), float64, decreasing along the first axis."""
    check_skip_interval(skip_interval, num_steps)
    delta = 1.0 / num_steps
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) * (1 - skip_interval * delta)
    steps = torch.arange(skip_interval + 1, device=device, dtype=torch.float64)
    s = 1 - (u[None, :] + steps[:, None] * delta)
    return rf_to_trig(shift_rf_time(s, shift))


def teacher_trigflow_walk(teacher_x0: TeacherX0, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Euler steps in TrigFlow time along ``times`` (K+1, B): x ← x − (t_k − t_{k+1})·F_T(x, t_k), no grad."""
    with torch.no_grad():
        for t_now, t_next in zip(times[:-1], times[1:]):
            teacher_velocity = velocity_from_x0(x, t_now, teacher_x0(x, t_now))
            x = x - per_sample(t_now - t_next, x) * teacher_velocity.to(x.dtype)
    return x


def dcm_loss(student_x0_now: torch.Tensor, student_x0_next: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """Σ(x0̂(t_0) − sg(x0̂(t_m)))² per sample, batch mean, × loss_scale."""
    difference = student_x0_now.double() - student_x0_next.detach().double()
    return loss_scale * (difference**2).flatten(1).sum(1).mean()
