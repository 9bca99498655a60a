"""A 3-D convolution run as one 2-D convolution per temporal tap, frames as the batch, channels last.

cuDNN's 3×3×3 kernels are slow at few channels: on an H100 (torch 2.11, bf16) the Wan VAE decoder's
full-resolution convolution (96 channels, 480×832) runs at 191 TFLOP/s as conv3d and 238 in
channels_last_3d, but at 332 as three summed channels-last conv2d over frames (`bench/vae_decode.py
--convs`). That layer alone is a third of the decode's 275 TFLOP. `use_frame_convs` swaps the convolution of
chosen `nn.Conv3d` modules for this form, from outside the model; the module keeps its parameters,
its padding of time (causal or not) and everything else.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def conv3d_as_frame_convs(x_BCTHW: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          padding_hw: tuple[int, int]) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=(0, *padding_hw)) for stride 1: Σ_k conv2d(frames t + k, weight[:, :, k])."""
    batch, channels, frames, height, width = x_BCTHW.shape
    out_channels, taps = weight.shape[0], weight.shape[2]
    out_frames = frames - taps + 1
    # (B·T, C, H, W) with channels innermost: the layout cuDNN's fast 2-D kernels read.
    frames_NCHW = x_BCTHW.transpose(1, 2).reshape(batch * frames, channels, height, width)
    frames_NCHW = frames_NCHW.contiguous(memory_format=torch.channels_last)
    per_video = frames_NCHW.view(batch, frames, channels, height, width)
    out = None
    for k in range(taps):
        window = per_video[:, k:k + out_frames].reshape(batch * out_frames, channels, height, width)
        tap = weight[:, :, k].contiguous(memory_format=torch.channels_last)
        y = F.conv2d(window, tap, bias if k == 0 else None, padding=padding_hw)
        out = y if out is None else out + y
    return out.view(batch, out_frames, out_channels, *out.shape[-2:]).transpose(1, 2)


def _frame_conv_forward(module: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return conv3d_as_frame_convs(x, weight, bias, (module.padding[1], module.padding[2]))


def use_frame_convs(model: nn.Module, max_channels: int = 96, min_kernel_frames: int = 3) -> int:
    """Run every stride-1 `nn.Conv3d` of ``model`` with at most ``max_channels`` input channels and at least
    ``min_kernel_frames`` temporal taps as per-tap 2-D convolutions; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if (not isinstance(module, nn.Conv3d) or module.in_channels > max_channels
                or module.kernel_size[0] < min_kernel_frames or module.stride != (1, 1, 1)
                or module.dilation != (1, 1, 1) or module.groups != 1 or module.padding_mode != "zeros"
                or isinstance(module.padding, str) or module.padding[0] != 0):  # time is padded before the call
            continue
        # nn.Conv3d.forward calls self._conv_forward(input, weight, bias): the one place the kernel is chosen.
        module._conv_forward = functools.partial(_frame_conv_forward, module)
        switched += 1
    return switched


__all__ = ["conv3d_as_frame_convs", "use_frame_convs"]
