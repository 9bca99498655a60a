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


# -- tiny Wan2.1 release files (tokenizer, umT5, VAE) for the text and video paths --------------------

TINY_WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "red", "fox", "snow"]


def write_tiny_tokenizer(directory, words=TINY_WORDS) -> dict[str, int]:
    """A T5-like word-level tokenizer.json (<pad>=0, </s>=1, <unk>=2, then ``words``) in ``directory``; its vocabulary."""
    import pytest

    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(words)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return vocab


def write_tiny_umt5(path, dim: int, vocab_size: int = 3 + len(TINY_WORDS), seed: int = 0) -> dict:
    """A one-layer umT5 encoder with output width ``dim`` and random weights saved (bf16, like the official file)
    at ``path``; returns its UMT5Config fields (JSON-ready)."""
    from rcm.models.umt5 import UMT5Config, UMT5Encoder

    fields = dict(vocab_size=vocab_size, dim=dim, dim_attn=dim, dim_ffn=2 * dim, num_heads=2, num_layers=1,
                  num_buckets=8)
    torch.manual_seed(seed)
    encoder = UMT5Encoder(UMT5Config(**fields))
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: tensor.to(torch.bfloat16) for name, tensor in encoder.state_dict().items()}, path)
    return fields


def write_tiny_wan_vae(path, z_dim: int, seed: int = 0) -> dict:
    """A Wan VAE with the real 4× temporal / 8× spatial compression, 4 base channels and ``z_dim`` latent channels
    (unit latent statistics), random weights saved at ``path``; returns its WanVAEConfig fields (JSON-ready)."""
    from rcm.models.wan_vae import WanVAE, WanVAEConfig

    fields = dict(dim=4, z_dim=z_dim, num_res_blocks=1, latent_mean=[0.0] * z_dim, latent_std=[1.0] * z_dim)
    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig(**fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), path)
    return fields


def load_tool(name: str):
    """A script of tools/ imported as a module (tools/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
