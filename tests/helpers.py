"""Small builders shared by tests: a float64 tiny DiT and a toy batch."""
from __future__ import annotations

import torch

from rcm.models.wan_dit import WanDiT, WanDiTConfig

TINY = dict(
    dim=32, ffn_dim=64, freq_dim=16, text_dim=8, text_len=4, num_heads=2, num_layers=1,
    in_channels=2, out_channels=2, patch_size=(1, 2, 2),
)
LATENT_SHAPE = (2, 2, 4, 4)  # C, T, H, W


def tiny_dit(seed: int = 0, dtype=torch.float64, **overrides) -> WanDiT:
    """A one-block DiT with random (non-zero) weights, so every path matters."""
    torch.manual_seed(seed)
    model = WanDiT(WanDiTConfig(**{**TINY, **overrides})).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # Wan zero-inits some layers; randomize so gradients are informative
            p.add_(0.05 * torch.randn_like(p))
    return model


def toy_batch(batch: int = 3, seed: int = 1, dtype=torch.float64):
    """(x0, noise, context) with the tiny model's shapes."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *LATENT_SHAPE, generator=g, dtype=dtype)
    noise = torch.randn(batch, *LATENT_SHAPE, generator=g, dtype=dtype)
    context = torch.randn(batch, TINY["text_len"], TINY["text_dim"], generator=g, dtype=dtype)
    return x0, noise, context
