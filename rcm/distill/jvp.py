"""Velocity and its tangent (JVP) of a TrigFlow network in one forward pass.

The sCM loss needs ``F_θ(x_t, t)`` with gradients and ``dF = ∂F/∂x·ẋ + ∂F/∂t·ṫ`` without. Forward-mode
AD gives both from one forward: the primal keeps its autograd graph to the parameters, the tangent is
detached. The reference runs a JVP pass and a separate gradient pass; this saves one forward.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from rcm.distill.trigflow import FlowNetwork, velocity


def velocity_and_tangent(
    network: FlowNetwork,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_dot: torch.Tensor,
    t_dot: torch.Tensor,
    context: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, dF) at (x_t, t) along (ẋ, ṫ): F carries gradients to the parameters, dF is detached."""
    with forward_ad.dual_level():
        x_dual = forward_ad.make_dual(x_t, x_dot.to(x_t.dtype))
        t_dual = forward_ad.make_dual(t.double(), t_dot.double())
        unpacked = forward_ad.unpack_dual(velocity(network, x_dual, t_dual, context))
    tangent = unpacked.tangent
    if tangent is None:  # the network ignores its inputs (only in degenerate tests)
        tangent = torch.zeros_like(unpacked.primal)
    return unpacked.primal, tangent.detach()


def velocity_tangent_two_pass(
    network: FlowNetwork,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_dot: torch.Tensor,
    t_dot: torch.Tensor,
    context: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's two passes (``torch.func.jvp`` without grad, then a plain forward); for tests."""
    with torch.no_grad():
        _, tangent = torch.func.jvp(
            lambda x, time: velocity(network, x, time, context), (x_t, t.double()), (x_dot.to(x_t.dtype), t_dot.double())
        )
    return velocity(network, x_t, t, context), tangent
