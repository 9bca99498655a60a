"""Faster forms of a stride-1 3-D convolution for cuDNN, swapped into chosen `nn.Conv3d` modules from outside.

cuDNN's 3×3×3 kernels are slow at few channels: on an H100 (torch 2.11, bf16) the Wan VAE decoder's
full-resolution convolution (96 channels, 480×832) runs at 191 TFLOP/s as conv3d and 238 in
channels_last_3d, but at 332 as three summed channels-last conv2d over frames (`bench/vae_decode.py
--convs`). That layer alone is a third of the decode's 275 TFLOP. Three forms, all equal to conv3d:

  taps             one channels-last conv2d per temporal tap, frames as the batch, summed;
  stacked          one channels-last conv2d whose input channels are the taps' frames side by side
                   (C·k channels): one larger GEMM instead of k smaller ones and their sum;
  channels_last_3d cuDNN conv3d with input and weight channels-last.

Inside the compiled Wan decoder `taps` wins for every 3-frame convolution (480p, 3 latent frames per chunk: 0.79 s against 1.07 s
for plain conv3d; `stacked` and `channels_last_3d` lose there, see docs/benchmarks.md). `use_frame_convs`
swaps the convolution of the chosen modules; each keeps its parameters, its padding of time (causal or not)
and everything else.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("taps", "stacked", "channels_last_3d")


def _frames_channels_last(x_BCTHW: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) → (B, T, C, H, W) whose every frame is channels-last: the layout cuDNN's fast 2-D kernels read."""
    batch, channels, frames, height, width = x_BCTHW.shape
    frames_NCHW = x_BCTHW.transpose(1, 2).reshape(batch * frames, channels, height, width)
    return frames_NCHW.contiguous(memory_format=torch.channels_last).view(batch, frames, channels, height, width)


def _as_video(y_NCHW: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·T, C, H, W) → (B, C, T, H, W): a view (channels-last frames give a channels_last_3d video)."""
    return y_NCHW.view(batch, -1, *y_NCHW.shape[1:]).transpose(1, 2)


def conv3d_as_frame_convs(x_BCTHW: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          padding_hw: tuple[int, int]) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=(0, *padding_hw)) for stride 1: Σ_k conv2d(frames t + k, weight[:, :, k])."""
    batch, channels, frames, height, width = x_BCTHW.shape
    taps = weight.shape[2]
    out_frames = frames - taps + 1
    per_video = _frames_channels_last(x_BCTHW)
    out = None
    for k in range(taps):
        window = per_video[:, k:k + out_frames].reshape(batch * out_frames, channels, height, width)
        tap = weight[:, :, k].contiguous(memory_format=torch.channels_last)
        y = F.conv2d(window, tap, bias if k == 0 else None, padding=padding_hw)
        out = y if out is None else out + y
    return _as_video(out, batch)


def conv3d_as_stacked_frame_conv(x_BCTHW: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 padding_hw: tuple[int, int]) -> torch.Tensor:
    """The same convolution as one conv2d: output frame t reads frames t … t + k − 1 stacked along channels."""
    batch, channels, frames, height, width = x_BCTHW.shape
    out_channels, _, taps, kernel_h, kernel_w = weight.shape
    out_frames = frames - taps + 1
    per_frame = x_BCTHW.transpose(1, 2)  # (B, T, C, H, W)
    stacked = torch.cat([per_frame[:, k:k + out_frames] for k in range(taps)], dim=2)
    stacked = stacked.reshape(batch * out_frames, taps * channels, height, width).contiguous(memory_format=torch.channels_last)
    # Input channel k·C + c of the stacked frame is channel c of tap k.
    stacked_weight = weight.transpose(1, 2).reshape(out_channels, taps * channels, kernel_h, kernel_w)
    y = F.conv2d(stacked, stacked_weight.contiguous(memory_format=torch.channels_last), bias, padding=padding_hw)
    return _as_video(y, batch)


def _conv_in_form(form: str, module: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    padding_hw = (module.padding[1], module.padding[2])
    if form == "taps":
        return conv3d_as_frame_convs(x, weight, bias, padding_hw)
    if form == "stacked":
        return conv3d_as_stacked_frame_conv(x, weight, bias, padding_hw)
    return F.conv3d(x.contiguous(memory_format=torch.channels_last_3d), weight.contiguous(memory_format=torch.channels_last_3d),
                    bias, padding=module.padding)


def use_frame_convs(model: nn.Module, max_channels: int = 96, min_kernel_frames: int = 3, form: str = "taps",
                    min_channels: int = 1) -> int:
    """Run every stride-1 `nn.Conv3d` of ``model`` with ``min_channels`` to ``max_channels`` input channels and at
    least ``min_kernel_frames`` temporal taps in ``form`` (see the module's docstring); returns how many were switched."""
    if form not in FORMS:
        raise ValueError(f"use_frame_convs: form must be one of {', '.join(FORMS)}; got {form!r}.")
    switched = 0
    for module in model.modules():
        if (not isinstance(module, nn.Conv3d) or not min_channels <= module.in_channels <= max_channels
                or module.kernel_size[0] < min_kernel_frames or module.stride != (1, 1, 1)
                or module.dilation != (1, 1, 1) or module.groups != 1 or module.padding_mode != "zeros"
                or isinstance(module.padding, str) or module.padding[0] != 0):  # time is padded before the call
            continue
        # nn.Conv3d.forward calls self._conv_forward(input, weight, bias): the one place the kernel is chosen.
        module._conv_forward = functools.partial(_conv_in_form, form, module)
        switched += 1
    return switched


__all__ = ["FORMS", "conv3d_as_frame_convs", "conv3d_as_stacked_frame_conv", "use_frame_convs"]
