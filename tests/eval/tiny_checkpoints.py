"""Builders shared by the evaluation and data-builder tests: tiny-preset networks with random weights saved
as `.pth`, and the default toy ground truth (whose latent and text shapes match the tiny preset)."""
from __future__ import annotations

from pathlib import Path

import torch

from rcm.data.toy import ToyMixture

TINY_PRESET = "tiny"


def write_tiny_checkpoint(path: Path, seed: int) -> Path:
    """A `.pth` of the tiny model preset with random, non-zero weights (Wan zero-inits some layers)."""
    from rcm.config import load_config
    from rcm.train import build_network

    model_cfg = load_config([f"model={TINY_PRESET}", "distill.method=flow_matching"]).model
    torch.manual_seed(seed)
    network = build_network(model_cfg)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    torch.save(network.state_dict(), path)
    return path


def write_ground_truth(path: Path) -> ToyMixture:
    """The default toy mixture, saved as a ground-truth file."""
    mixture = ToyMixture()
    mixture.save(path)
    return mixture
