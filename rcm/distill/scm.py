"""sCM consistency loss (forward divergence) with the rearranged JVP and tangent warmup (spec §2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rcm.distill.jvp import velocity_and_tangent
from rcm.distill.trigflow import FlowNetwork, per_sample, velocity_from_x0


@dataclass
class SCMOutput:
    """Loss (scalar, with gradient) and what the logs want to see."""

    loss: torch.Tensor
    num_nonfinite: int
    g_norm: float


def tangent_warmup_ratio(iteration: int, tangent_warmup: int) -> float:
    """r = min(1, iteration / tangent_warmup); 1 when warmup is disabled (0)."""
    if tangent_warmup <= 0:
        return 1.0
    return min(1.0, iteration / tangent_warmup)


def scm_target_direction(
    x_t: torch.Tensor,
    t: torch.Tensor,
    student_velocity: torch.Tensor,
    student_tangent: torch.Tensor,
    teacher_velocity: torch.Tensor,
    warmup_ratio: float,
) -> torch.Tensor:
    """g = −cos t·sqrt(1 − r²·sin²t)·(F_sg − F_T) − (r·cos t·sin t·x_t + dF), in float64."""
    t = t.double()
    cos_t = per_sample(torch.cos(t), x_t.double())
    sin_t = per_sample(torch.sin(t), x_t.double())
    r = warmup_ratio
    return -cos_t * torch.sqrt(1 - r**2 * sin_t**2) * (
        student_velocity.double() - teacher_velocity.double()
    ) - (r * cos_t * sin_t * x_t.double() + student_tangent.double())


def scm_loss(
    student: FlowNetwork,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    teacher_x0: torch.Tensor,
    iteration: int,
    tangent_warmup: int,
    loss_scale: float,
    normalization_eps: float = 0.1,
    jvp=velocity_and_tangent,
) -> SCMOutput:
    """sCM loss for a batch, given the teacher's (CFG) x0 prediction at x_t = cos t·x0 + sin t·ε."""
    cos_t = per_sample(torch.cos(t.double()), x0)
    sin_t = per_sample(torch.sin(t.double()), x0)
    x_t = cos_t * x0 + sin_t * noise
    teacher_velocity = velocity_from_x0(x_t, t, teacher_x0.to(x_t.dtype)).detach()
    # The "rearranged" tangents: scaling by cos t·sin t keeps dF bounded near t = π/2.
    cos_sin = torch.cos(t.double()) * torch.sin(t.double())
    x_dot = per_sample(cos_sin, x_t) * teacher_velocity
    # `jvp` may be swapped for the reference's two-pass version (benchmarks compare the two).
    student_velocity, student_tangent = jvp(student, x_t, t, x_dot, cos_sin, context)
    velocity_stopgrad = student_velocity.detach()

    g = scm_target_direction(
        x_t, t, velocity_stopgrad, student_tangent, teacher_velocity, tangent_warmup_ratio(iteration, tangent_warmup)
    )
    finite = _finite_per_sample(g) & _finite_per_sample(velocity_stopgrad)
    num_nonfinite = int((~finite).sum())
    if num_nonfinite:
        keep = per_sample(finite, g)
        g = torch.where(keep, g, torch.zeros_like(g))
        student_velocity = torch.where(per_sample(finite, student_velocity), student_velocity, 0.0)
        velocity_stopgrad = torch.where(per_sample(finite, velocity_stopgrad), velocity_stopgrad, 0.0)
    g_norm = _norm_per_sample(g)
    g = g / per_sample(g_norm + normalization_eps, g)
    per_sample_loss = ((student_velocity.double() - velocity_stopgrad.double() - g) ** 2).flatten(1).sum(1)
    return SCMOutput(
        loss=loss_scale * per_sample_loss.mean(), num_nonfinite=num_nonfinite, g_norm=float(g_norm.mean())
    )


def _finite_per_sample(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(1).all(1)


def _norm_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1).norm(dim=1)
