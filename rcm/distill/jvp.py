"""Velocity and its tangent (JVP) of a TrigFlow network in one forward pass.

The sCM loss needs ``F_θ(x_t, t)`` with gradients and ``dF = ∂F/∂x·ẋ + ∂F/∂t·ṫ`` without. A network
that carries tangents (``carries_tangents = True``, like ``WanDiT``) returns both from one forward, with
the tangent computed under no_grad; any other network goes through forward-mode AD, which also gives
both from one forward but records the tangent computation in the autograd graph. The reference runs a
JVP pass and a separate gradient pass; both paths here save that forward.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from rcm.distill.trigflow import FlowNetwork, per_sample, trigflow_coefficients, velocity


def velocity_and_tangent(
    network: FlowNetwork,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_dot: torch.Tensor,
    t_dot: torch.Tensor,
    context: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, dF) at (x_t, t) along (ẋ, ṫ): F carries gradients to the parameters, dF is detached."""
    if getattr(network, "carries_tangents", False):
        return _velocity_and_tangent_explicit(network, x_t, t, x_dot, t_dot, context)
    with forward_ad.dual_level():
        x_dual = forward_ad.make_dual(x_t, x_dot.to(x_t.dtype))
        t_dual = forward_ad.make_dual(t.double(), t_dot.double())
        unpacked = forward_ad.unpack_dual(velocity(network, x_dual, t_dual, context))
    tangent = unpacked.tangent
    if tangent is None:  # the network ignores its inputs (only in degenerate tests)
        tangent = torch.zeros_like(unpacked.primal)
    return unpacked.primal, tangent.detach()


def _time_coefficients_with_tangents(t: torch.Tensor, t_dot: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(value, d/dt·ṫ) of every preconditioning coefficient, by forward-mode AD on (B,) float64 tensors."""
    with forward_ad.dual_level():
        t_dual = forward_ad.make_dual(t.double(), t_dot.double())
        coefficients = trigflow_coefficients(t_dual)._asdict()
        coefficients.update(cos=torch.cos(t_dual), sin=torch.sin(t_dual))
        result = {}
        for name, value in coefficients.items():
            primal, tangent = forward_ad.unpack_dual(value)
            result[name] = (primal, torch.zeros_like(primal) if tangent is None else tangent)
    return result


def _velocity_and_tangent_explicit(network, x_t, t, x_dot, t_dot, context):
    """The TrigFlow velocity of a tangent-carrying network, with the preconditioning's tangent written out."""
    c = _time_coefficients_with_tangents(t, t_dot)

    def coefficient(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        value, tangent = c[name]
        return per_sample(value, x_t), per_sample(tangent, x_t)

    (c_in, c_in_dot), (c_skip, c_skip_dot), (c_out, c_out_dot) = coefficient("c_in"), coefficient("c_skip"), coefficient("c_out")
    (cos_t, cos_dot), (sin_t, sin_dot) = coefficient("cos"), coefficient("sin")
    timestep_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    noise_level, noise_level_dot = c["c_noise"]
    with torch.no_grad():
        network_input_dot = c_in_dot * x_t + c_in * x_dot.to(x_t.dtype)
    out, out_dot = network(
        c_in * x_t, noise_level.to(timestep_dtype), context, x_dot=network_input_dot, timestep_dot=noise_level_dot.to(timestep_dtype)
    )
    out = out.to(x_t.dtype)
    x0 = c_skip * x_t + c_out * out
    velocity_value = (cos_t * x_t - x0) / sin_t
    with torch.no_grad():
        x0_dot = c_skip_dot * x_t + c_skip * x_dot + c_out_dot * out + c_out * out_dot.to(x_t.dtype)
        velocity_dot = (cos_dot * x_t + cos_t * x_dot - x0_dot - velocity_value * sin_dot) / sin_t
    return velocity_value, velocity_dot


def velocity_tangent_two_pass(
    network: FlowNetwork,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_dot: torch.Tensor,
    t_dot: torch.Tensor,
    context: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's two passes (``torch.func.jvp`` without grad, then a plain forward); for tests and benchmarks."""
    with torch.no_grad():
        _, tangent = torch.func.jvp(
            lambda x, time: velocity(network, x, time, context), (x_t, t.double()), (x_dot.to(x_t.dtype), t_dot.double())
        )
    return velocity(network, x_t, t, context), tangent
