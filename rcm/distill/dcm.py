"""Discrete-time consistency (dCM), the JVP-free baseline (spec §2, last paragraph)."""
from __future__ import annotations

import torch

from rcm.distill.time import rf_to_trig, shift_rf_time, trig_to_rf
from rcm.distill.trigflow import per_sample


def dcm_rf_grid(num_steps: int, shift: float) -> torch.Tensor:
    """RF times s_0 = 1 > s_1 > ... > s_N = 0 (float64), uniform in u then shifted."""
    return shift_rf_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def teacher_euler_step(x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step of the teacher from t to t_next, taken in RF space, returned in TrigFlow."""
    s, s_next = trig_to_rf(t), trig_to_rf(t_next)
    x_s = x_t / per_sample(torch.cos(t.double()) + torch.sin(t.double()), x_t)
    velocity_rf = (x_s - teacher_x0) / per_sample(s, x_s)
    x_s_next = x_s + per_sample(s_next - s, x_s) * velocity_rf
    return x_s_next * per_sample(torch.cos(t_next) + torch.sin(t_next), x_s_next)


def dcm_times(step_index: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TrigFlow times (t_k, t_{k+1}) for per-sample grid indices k."""
    grid = grid.to(step_index.device)
    return rf_to_trig(grid[step_index]), rf_to_trig(grid[step_index + 1])


def dcm_loss(student_x0_now: torch.Tensor, student_x0_next: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """Σ(x0̂(t_k) − sg(x0̂(t_{k+1})))² per sample, batch mean, × loss_scale."""
    difference = student_x0_now.double() - student_x0_next.detach().double()
    return loss_scale * (difference**2).flatten(1).sum(1).mean()
