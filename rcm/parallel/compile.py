"""`apply_compile`: torch.compile each DiT block, applied from outside the model (and, at the end,
`compile_vae_decoder` / `speed_up_vae_decoder` for the VAE's decode).

Wan's blocks keep a float32 residual stream, float32 norms and modulation between bf16 matmuls; eager
PyTorch runs each of those elementwise steps as its own kernel (casts and copies were ~36 % of CUDA
time in the 480p sCM step). Compiling a block fuses them. Blocks are compiled one by one (as in
torchtitan) rather than the whole network: every block has the same code, so one graph serves all 30
or 40, and the attention kernels stay opaque custom ops in between.

Order inside `parallelize_wan_dit`: after context parallelism (its all-to-alls are part of the
block), before activation checkpointing (our JVP-mode checkpoint is an autograd.Function that holds
the block's forward; it calls the compiled forward rather than being traced itself) and before FSDP2.
"""
from __future__ import annotations

import torch
from torch import nn

from rcm.ops.frame_convs import use_frame_convs


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """Replace each block's forward with a compiled one (same parameters and names); returns how many."""
    if any(getattr(block, "_rcm_checkpointed", False) for block in model.blocks):
        raise ValueError("apply_compile must run before apply_activation_checkpointing (see rcm/parallel/parallelize.py)")
    compiled = 0
    for block in model.blocks:
        if getattr(block, "_rcm_compiled", False):
            continue
        # dynamic=False: a run has one latent shape; recompiling for a new one is cheaper than dynamic kernels.
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
        block._rcm_compiled = True
        compiled += 1
    return compiled


def compile_vae_decoder(vae: nn.Module, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """torch.compile the VAE decoder's per-chunk forward (``vae.decoder``), in place; returns ``vae``.

    The decode is dominated by 3×3×3 convolutions at full and half resolution whose inputs are first
    RMS-normalized, passed through SiLU and concatenated with the cached past frames: five or more eager
    passes over each activation per convolution. Compiled, that is one fused pass (the convolutions stay
    cuDNN calls). Dynamo traces the whole chunk, cache dictionary included, in one graph: one graph for the
    first chunk (empty cache) and one for every later chunk. ``mode`` is torch.compile's (inductor only);
    not "reduce-overhead": CUDA graphs would overwrite a chunk's output and cache with the next chunk's.
    """
    if mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"compile_vae_decoder: mode {mode!r} would use CUDA graphs, which overwrite each chunk's output "
                         "and cache with the next chunk's; use 'default' or 'max-autotune-no-cudagraphs'.")
    decoder = vae.decoder
    if not getattr(decoder, "_rcm_compiled", False):
        decoder.forward = torch.compile(decoder.forward, backend=backend, dynamic=False, mode=mode)
        decoder._rcm_compiled = True
    return vae


# Decoder recipes: (form of rcm.ops.frame_convs, min input channels, max input channels) applied in order to
# the decoder's 3-frame convolutions before compiling. bench/vae_decode.py --compile times each one.
VAE_DECODER_RECIPES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "compiled": (),
    "taps96": (("taps", 1, 96),),
    "stacked96": (("stacked", 1, 96),),
    "taps_all": (("taps", 1, 384),),
    "stacked_all": (("stacked", 1, 384),),
    "taps96_cl3d": (("taps", 1, 96), ("channels_last_3d", 97, 384)),
    "stacked96_cl3d": (("stacked", 1, 96), ("channels_last_3d", 97, 384)),
}
# The fastest measured decode (81 frames at 480p, bf16, H100, docs/benchmarks.md): 1.64 s eager, 1.14 s compiled,
# 0.91 s with the 96-channel convolutions as per-tap conv2d, 0.78 s with all of them so and 7 latent frames per
# chunk (15.6 GiB peak; 0.81 s at 3 frames and 8.8 GiB; 21 frames is no faster at 36.5 GiB).
DEFAULT_VAE_RECIPE = "taps_all"
DEFAULT_VAE_CHUNK_FRAMES = 7


def speed_up_vae_decoder(vae: nn.Module, backend: str = "inductor", recipe: str = DEFAULT_VAE_RECIPE,
                         mode: str | None = None) -> nn.Module:
    """The decoder's 3-frame convolutions in the forms of ``recipe`` (`VAE_DECODER_RECIPES`), then compiled.
    The default is the fastest measured (see `DEFAULT_VAE_RECIPE`); decode with `DEFAULT_VAE_CHUNK_FRAMES`."""
    if recipe not in VAE_DECODER_RECIPES:
        raise ValueError(f"speed_up_vae_decoder: unknown recipe {recipe!r}; choose from {', '.join(VAE_DECODER_RECIPES)}.")
    if not getattr(vae.decoder, "_rcm_compiled", False):  # a compiled forward has already traced its kernels
        for form, min_channels, max_channels in VAE_DECODER_RECIPES[recipe]:
            use_frame_convs(vae.decoder, max_channels=max_channels, min_channels=min_channels, form=form)
    return compile_vae_decoder(vae, backend=backend, mode=mode)


__all__ = ["DEFAULT_VAE_CHUNK_FRAMES", "DEFAULT_VAE_RECIPE", "VAE_DECODER_RECIPES", "apply_compile", "compile_vae_decoder", "speed_up_vae_decoder"]
