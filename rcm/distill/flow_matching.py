"""Wan's flow-matching objective, used to pretrain the toy teacher."""
from __future__ import annotations

import torch

from rcm.distill.trigflow import FlowNetwork, per_sample


def flow_matching_loss(
    network: FlowNetwork, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """MSE between v(x_s, 1000·s) and ε − x0, with x_s = (1−s)·x0 + s·ε."""
    s_x = per_sample(s, x0)
    x_s = (1 - s_x) * x0 + s_x * noise
    timestep_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    prediction = network(x_s, (1000 * s).to(timestep_dtype), context)
    return ((prediction.float() - (noise - x0).float()) ** 2).mean()
