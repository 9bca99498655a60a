"""Wan2.1 text-to-video diffusion transformer, with the official checkpoint's parameter names and shapes.

Plain PyTorch: no parallelism, no checkpoint logic. Works under torch.func.jvp and
torch.autograd.forward_ad (RoPE uses real arithmetic, attention goes through `rcm.ops.attention`).
Precision follows Wan: the time path, the norms, the adaLN modulation, the residual stream and the
head run in float32 (float64 for a float64 model); the block Linears run in the parameters' dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcm.models.tangent import (
    gelu_tanh_tangent,
    layer_norm_tangent,
    linear_tangent,
    modulate_tangent,
    rms_norm_tangent,
    silu_tangent,
)
from rcm.ops.attention import attention, attention_with_tangent, attention_backend_names

ROPE_THETA = 10000.0
TIME_EMBEDDING_BASE = 10000.0


@dataclass
class WanDiTConfig:
    """Sizes of a Wan2.1 T2V DiT; the fields mirror the official `WanModel` arguments."""

    dim: int
    ffn_dim: int
    freq_dim: int
    text_dim: int
    text_len: int
    num_heads: int
    num_layers: int
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        for name in ("dim", "ffn_dim", "freq_dim", "text_dim", "text_len", "num_heads", "num_layers",
                     "in_channels", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}.")
        patch = list(self.patch_size) if isinstance(self.patch_size, (list, tuple)) else None
        patch_ok = patch is not None and len(patch) == 3 and all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)
        if patch_ok:
            self.patch_size = tuple(patch)
        else:
            problems.append(
                f"patch_size must be three positive integers (frames, height, width), got {self.patch_size!r}.")
        if not problems:
            if self.freq_dim % 2:
                problems.append(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}.")
            if self.dim % self.num_heads:
                problems.append(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}).")
            elif self.head_dim % 2 or self.head_dim < 6:
                problems.append(
                    f"head_dim = dim / num_heads = {self.head_dim} must be even and at least 6 so the 3-axis "
                    "RoPE (frames, height, width) gets an even, non-empty share per axis.")
        if not self.eps > 0:
            problems.append(f"eps must be positive, got {self.eps!r}.")
        if self.attention_backend not in attention_backend_names():
            problems.append(f"attention_backend must be one of {', '.join(attention_backend_names())}, "
                            f"got {self.attention_backend!r}.")
        if problems:
            raise ValueError("Invalid WanDiTConfig: " + " ".join(problems))

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim // self.num_heads

    @property
    def rope_axis_dims(self) -> tuple[int, int, int]:
        """Head channels rotated by frame, height and width position (Wan's split of head_dim)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


# ----------------------------------------------------------------------------------------------------
# embeddings


def sinusoidal_time_embedding(timestep_B: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """[cos, sin] of timestep·10000^(−i/half), i < freq_dim/2, in float64 as Wan computes it: (B, freq_dim)."""
    half = freq_dim // 2
    position = timestep_B.to(torch.float64)
    exponents = torch.arange(half, dtype=torch.float64, device=timestep_B.device) / half
    angles = position[:, None] * torch.pow(TIME_EMBEDDING_BASE, -exponents)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_cos_sin(
    grid_THW: tuple[int, int, int], axis_dims: tuple[int, int, int], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 3-axis RoPE angles for a (T, H, W) token grid, each (T·H·W, 1, head_dim/2), float64.

    Channel pair i of a head belongs to the frame axis first, then height, then width; within an axis of
    d channels the pair j turns at frequency θ^(−2j/d), as in Wan's `rope_params`.
    """
    angles = []
    for axis, (length, axis_dim) in enumerate(zip(grid_THW, axis_dims)):
        inverse_frequency = 1.0 / torch.pow(
            ROPE_THETA, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        axis_angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inverse_frequency)
        shape = [1, 1, 1, axis_dim // 2]
        shape[axis] = length
        angles.append(axis_angles.view(shape).expand(*grid_THW, axis_dim // 2))
    angles_L = torch.cat(angles, dim=-1).reshape(math.prod(grid_THW), 1, -1)
    return torch.cos(angles_L), torch.sin(angles_L)


def apply_rope(x_BLHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x₀, x₁) by the angles: the complex product of Wan, in real arithmetic."""
    compute = torch.promote_types(x_BLHD.dtype, torch.float32)
    pairs = x_BLHD.to(compute).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(compute), sin.to(compute)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_BLHD.dtype)


def _linear_in_dtype(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype, with_bias: bool = True) -> torch.Tensor:
    """`layer(x)` with input and weights cast to `dtype`, even under autocast.

    Wan runs the time path and the head inside float32 autocast regions: the timestep's small
    differences (and their JVP tangents) would be lost in bfloat16.
    """
    bias = None if layer.bias is None or not with_bias else layer.bias.to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


# ----------------------------------------------------------------------------------------------------
# layers


class WanRMSNorm(nn.Module):
    """RMS norm over the last dimension with a learned weight, normalizing in float32 or wider."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize x (…, dim) and scale it by the weight; keeps x's dtype (q, k and v must share one)."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normalized = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normalized * self.weight.to(wide.dtype)).to(x.dtype)

    def tangent(self, x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
        """The output's tangent for input x with tangent ẋ (no gradient)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        return rms_norm_tangent(x.to(wide), x_dot.to(wide), self.eps, self.weight).to(x_dot.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 or wider; returns the wide dtype (Wan's residual stream is float32)."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Layer-normalize x (…, dim) in float32 or wider."""
        wide = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(wide)
        bias = None if self.bias is None else self.bias.to(wide)
        return F.layer_norm(x.to(wide), self.normalized_shape, weight, bias, self.eps)

    def tangent(self, x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
        """The output's tangent for input x with tangent ẋ (no gradient), in the wide dtype."""
        wide = torch.promote_types(x.dtype, torch.float32)
        return layer_norm_tangent(x.to(wide), x_dot.to(wide), self.eps, self.weight)


class WanSelfAttention(nn.Module):
    """Multi-head self-attention with RMS q/k norm over the full dim and 3-axis RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, attention_backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.attention_backend = attention_backend
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x_BLD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], x_dot: torch.Tensor | None = None):
        """Attend the tokens to each other; rope = (cos, sin) from `rope_cos_sin`.

        With a tangent ẋ, returns (out, out_dot) (see `rcm.models.tangent`)."""
        q_in, k_in = self.q(x_BLD), self.k(x_BLD)
        q = self.norm_q(q_in).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(k_in).unflatten(-1, (self.num_heads, -1))
        v = self.v(x_BLD).unflatten(-1, (self.num_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if x_dot is None:
            return self.o(self.attend(q, k, v).flatten(2))
        with torch.no_grad():
            q_dot = apply_rope(self._norm_tangent(self.norm_q, q_in, linear_tangent(self.q.weight, x_dot)), *rope)
            k_dot = apply_rope(self._norm_tangent(self.norm_k, k_in, linear_tangent(self.k.weight, x_dot)), *rope)
            v_dot = linear_tangent(self.v.weight, x_dot).unflatten(-1, (self.num_heads, -1))
        out, out_dot = self.attend_with_tangent(q, k, v, q_dot.to(q.dtype), k_dot.to(k.dtype), v_dot.to(v.dtype))
        return self.o(out.flatten(2)), linear_tangent(self.o.weight, out_dot.flatten(2))

    # Context parallelism (rcm/parallel/context_parallel.py) replaces these two on the instance: the
    # tokens arrive sequence-sharded and attention must see every token.
    def attend(self, q_BNHD: torch.Tensor, k_BNHD: torch.Tensor, v_BNHD: torch.Tensor) -> torch.Tensor:
        """Attention of this layer's queries over its keys and values, (B, N, H, D)."""
        return attention(q_BNHD, k_BNHD, v_BNHD, backend=self.attention_backend)

    def attend_with_tangent(self, q, k, v, q_dot, k_dot, v_dot) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend` in JVP mode: (O, Ȯ) for (B, N, H, D) inputs and their tangents (None = zero)."""
        return attention_with_tangent(q, k, v, q_dot, k_dot, v_dot, backend=self.attention_backend)

    def _norm_tangent(self, norm: nn.Module, x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
        """Tangent of the q/k norm, split into heads."""
        tangent = norm.tangent(x, x_dot) if isinstance(norm, WanRMSNorm) else x_dot
        return tangent.unflatten(-1, (self.num_heads, -1))


class WanCrossAttention(WanSelfAttention):
    """Attention from the video tokens to all text tokens (no RoPE, no padding mask, as Wan T2V)."""

    def forward(self, x_BLD: torch.Tensor, context_BLD: torch.Tensor, x_dot: torch.Tensor | None = None):
        """Attend the video tokens x to the embedded text context (the text has no tangent)."""
        q_in = self.q(x_BLD)
        q = self.norm_q(q_in).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(context_BLD)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context_BLD).unflatten(-1, (self.num_heads, -1))
        if x_dot is None:
            return self.o(self.attend(q, k, v).flatten(2))
        q_dot = self._norm_tangent(self.norm_q, q_in, linear_tangent(self.q.weight, x_dot))
        out, out_dot = self.attend_with_tangent(q, k, v, q_dot.to(q.dtype), None, None)
        return self.o(out.flatten(2)), linear_tangent(self.o.weight, out_dot.flatten(2))


class WanAttentionBlock(nn.Module):
    """Self-attention, cross-attention and FFN with Wan's 6-way adaLN modulation (cross-attention unmodulated)."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.qk_norm, eps, config.attention_backend)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.qk_norm, eps, config.attention_backend)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x_BLD: torch.Tensor,
        time_B6D: torch.Tensor,
        context_BLD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        x_dot: torch.Tensor | None = None,
        time_dot_B6D: torch.Tensor | None = None,
    ):
        """One block on the wide (float32+) residual stream x; time_B6D is the projected time embedding.

        With tangents (ẋ, time tangent) returns (x, ẋ) for the block's output."""
        if x_dot is not None:
            return self._forward_with_tangent(x_BLD, time_B6D, context_BLD, rope, x_dot, time_dot_B6D)
        wide = time_B6D.dtype
        linear_dtype = self.self_attn.q.weight.dtype
        shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = (
            self.modulation.to(wide) + time_B6D).chunk(6, dim=1)

        y = self.self_attn((self.norm1(x_BLD) * (1 + scale_attn) + shift_attn).to(linear_dtype), rope)
        x_BLD = x_BLD + y.to(wide) * gate_attn
        x_BLD = x_BLD + self.cross_attn(self.norm3(x_BLD).to(linear_dtype), context_BLD).to(wide)
        y = self.ffn((self.norm2(x_BLD) * (1 + scale_ffn) + shift_ffn).to(linear_dtype))
        return x_BLD + y.to(wide) * gate_ffn

    def _forward_with_tangent(self, x_BLD, time_B6D, context_BLD, rope, x_dot, time_dot_B6D):
        """The same computation as `forward`, each step also producing its tangent (under no_grad)."""
        wide = time_B6D.dtype
        linear_dtype = self.self_attn.q.weight.dtype
        shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = (
            self.modulation.to(wide) + time_B6D).chunk(6, dim=1)
        (shift_attn_dot, scale_attn_dot, gate_attn_dot, shift_ffn_dot, scale_ffn_dot,
         gate_ffn_dot) = time_dot_B6D.to(wide).chunk(6, dim=1)

        normalized = self.norm1(x_BLD)
        with torch.no_grad():
            modulated_dot = modulate_tangent(normalized, self.norm1.tangent(x_BLD, x_dot), scale_attn, scale_attn_dot, shift_attn_dot)
        y, y_dot = self.self_attn((normalized * (1 + scale_attn) + shift_attn).to(linear_dtype), rope, modulated_dot.to(linear_dtype))
        with torch.no_grad():
            x_dot = x_dot + y_dot.to(wide) * gate_attn + y.to(wide) * gate_attn_dot
        x_BLD = x_BLD + y.to(wide) * gate_attn

        normalized = self.norm3(x_BLD)
        with torch.no_grad():
            normalized_dot = self.norm3.tangent(x_BLD, x_dot) if isinstance(self.norm3, WanLayerNorm) else x_dot
        y, y_dot = self.cross_attn(normalized.to(linear_dtype), context_BLD, normalized_dot.to(linear_dtype))
        x_BLD = x_BLD + y.to(wide)
        x_dot = x_dot + y_dot.to(wide)

        normalized = self.norm2(x_BLD)
        first, activation, second = self.ffn
        with torch.no_grad():
            modulated_dot = modulate_tangent(normalized, self.norm2.tangent(x_BLD, x_dot), scale_ffn, scale_ffn_dot, shift_ffn_dot)
        hidden = first((normalized * (1 + scale_ffn) + shift_ffn).to(linear_dtype))
        with torch.no_grad():
            hidden_dot = gelu_tanh_tangent(hidden, linear_tangent(first.weight, modulated_dot))
        y = second(activation(hidden))
        with torch.no_grad():
            y_dot = linear_tangent(second.weight, hidden_dot)
            x_dot = x_dot + y_dot.to(wide) * gate_ffn + y.to(wide) * gate_ffn_dot
        return x_BLD + y.to(wide) * gate_ffn, x_dot


class WanHead(nn.Module):
    """Final modulated LayerNorm and Linear to patch_volume·out_channels values per token."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = WanLayerNorm(dim, config.eps)
        self.head = nn.Linear(dim, math.prod(config.patch_size) * config.out_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x_BLD: torch.Tensor, time_BD: torch.Tensor, x_dot=None, time_dot_BD=None):
        """Project tokens to patches, in the wide dtype of the time embedding (and the tangent, if given)."""
        wide = time_BD.dtype
        shift, scale = (self.modulation.to(wide) + time_BD.unsqueeze(1)).chunk(2, dim=1)
        normalized = self.norm(x_BLD)
        out = _linear_in_dtype(self.head, normalized * (1 + scale) + shift, wide)
        if x_dot is None:
            return out
        with torch.no_grad():
            shift_dot, scale_dot = time_dot_BD.unsqueeze(1).expand(-1, 2, -1).to(wide).chunk(2, dim=1)
            modulated_dot = modulate_tangent(normalized, self.norm.tangent(x_BLD, x_dot), scale, scale_dot, shift_dot)
            return out, _linear_in_dtype(self.head, modulated_dot, wide, with_bias=False)


# ----------------------------------------------------------------------------------------------------
# model


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT: `forward(x_BCTHW, timestep_B, context_BLD) -> velocity_BCTHW`."""

    # forward(..., x_dot=, timestep_dot=) returns (output, tangent) in one pass (see rcm.models.tangent).
    carries_tangents = True

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's initialization: Xavier Linears and patch embedding, N(0, 0.02) text/time MLPs, zero head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.patch_embedding.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.config.dim, -1))
        for module in (*self.text_embedding, *self.time_embedding):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, WanRMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=self.config.dim**-0.5)
        nn.init.normal_(self.head.modulation, std=self.config.dim**-0.5)
        nn.init.zeros_(self.head.head.weight)

    def adapt_state_dict(self, state_dict: dict, prefix: str = "") -> dict:
        """``state_dict`` with the rCM release's layout turned into ours (in place; returned). The release stores
        the patch embedding as a Linear over patches flattened in (channel, kt, kh, kw) order, weight
        [dim, C·kt·kh·kw]; the official Wan2.1 files as a Conv3d."""
        key = prefix + "patch_embedding.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 2 and weight.numel() == self.patch_embedding.weight.numel():
            state_dict[key] = weight.reshape(self.patch_embedding.weight.shape)
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(self.adapt_state_dict(state_dict, prefix), prefix, *args, **kwargs)

    def num_parameters(self) -> int:
        """Number of parameter elements."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        x_BCTHW: torch.Tensor,
        timestep_B: torch.Tensor,
        context_BLD: torch.Tensor,
        x_dot: torch.Tensor | None = None,
        timestep_dot: torch.Tensor | None = None,
    ):
        """Velocity for latent video x at flow-matching timestep t ∈ [0, 1000] given text embeddings.

        x_BCTHW: (B, in_channels, T, H, W), T/H/W divisible by patch_size; timestep_B: (B,);
        context_BLD: (B, L ≤ text_len, text_dim), zero-padded to text_len here. Returns
        (B, out_channels, T, H, W) in float32 (float64 for a float64 model).

        JVP mode: given tangents ẋ (like x) and ṫ (like timestep), returns (velocity, tangent) from this
        one forward. The velocity carries gradients; the tangent is computed without (the text has none).
        """
        self._check_inputs(x_BCTHW, timestep_B, context_BLD)
        with_tangent = x_dot is not None or timestep_dot is not None
        if with_tangent:
            x_dot = torch.zeros_like(x_BCTHW) if x_dot is None else x_dot
            timestep_dot = torch.zeros_like(timestep_B) if timestep_dot is None else timestep_dot
        config = self.config
        linear_dtype = self.patch_embedding.weight.dtype
        wide = torch.promote_types(linear_dtype, torch.float32)

        tokens = self.patch_embedding(x_BCTHW.to(linear_dtype))
        grid_THW = tuple(tokens.shape[2:])
        x_BLD = self.shard_tokens(tokens.flatten(2).transpose(1, 2).to(wide), dim=1)

        sinusoid = sinusoidal_time_embedding(timestep_B, config.freq_dim).to(wide)
        time_BD = self._time_embedding(sinusoid, wide)
        time_B6D = _linear_in_dtype(self.time_projection[1], self.time_projection[0](time_BD), wide)
        time_B6D = time_B6D.unflatten(1, (6, config.dim))

        padding = config.text_len - context_BLD.shape[1]
        context_BLD = self.text_embedding(F.pad(context_BLD.to(linear_dtype), (0, 0, 0, padding)))

        cos, sin = rope_cos_sin(grid_THW, config.rope_axis_dims, device=x_BLD.device)
        rope = (self.shard_tokens(cos.to(wide), dim=0), self.shard_tokens(sin.to(wide), dim=0))
        if with_tangent:
            return self._forward_with_tangent(x_BLD, x_dot, timestep_B, timestep_dot, sinusoid, time_BD, time_B6D,
                                              context_BLD, rope, grid_THW)
        for block in self.blocks:
            x_BLD = block(x_BLD, time_B6D, context_BLD, rope)
        patches = self.gather_tokens(self.head(x_BLD, time_BD), dim=1)
        return self._unpatchify(patches, grid_THW)

    def _forward_with_tangent(self, x_BLD, x_dot, timestep_B, timestep_dot, sinusoid, time_BD, time_B6D,
                              context_BLD, rope, grid_THW):
        """The rest of `forward` in JVP mode: tangents of the tokens and of the time path ride along."""
        wide = x_BLD.dtype
        linear_dtype = self.patch_embedding.weight.dtype
        with torch.no_grad():
            tokens_dot = F.conv3d(x_dot.to(linear_dtype), self.patch_embedding.weight, stride=self.config.patch_size)
            x_BLD_dot = self.shard_tokens(tokens_dot.flatten(2).transpose(1, 2).to(wide), dim=1)
            time_BD_dot, time_B6D_dot = self._time_tangent(timestep_B, timestep_dot, sinusoid, time_BD, wide)
        for block in self.blocks:
            x_BLD, x_BLD_dot = block(x_BLD, time_B6D, context_BLD, rope, x_BLD_dot, time_B6D_dot)
        patches, patches_dot = self.head(x_BLD, time_BD, x_BLD_dot, time_BD_dot)
        patches = self.gather_tokens(patches, dim=1)
        with torch.no_grad():
            patches_dot = self.gather_tokens(patches_dot, dim=1)
        return self._unpatchify(patches, grid_THW), self._unpatchify(patches_dot, grid_THW)

    # Context parallelism (rcm/parallel/context_parallel.py) replaces these two on the instance so that
    # the blocks see only this rank's share of the tokens; in one process every rank's share is all of them.
    def shard_tokens(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of the video tokens along ``dim`` (the token axis): here, all of them."""
        return tokens

    def gather_tokens(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's share of the tokens concatenated along ``dim``, the inverse of `shard_tokens`: here, the input."""
        return tokens

    @torch.no_grad()
    def _time_tangent(self, timestep_B, timestep_dot, sinusoid, time_BD, wide):
        """Tangents of the time embedding (B, dim) and its 6-way projection (B, 6, dim) along ṫ."""
        half = self.config.freq_dim // 2
        frequencies = torch.pow(TIME_EMBEDDING_BASE, -torch.arange(half, dtype=torch.float64, device=timestep_B.device) / half)
        angle_dot = timestep_dot.to(torch.float64)[:, None] * frequencies[None, :]
        cos_part, sin_part = sinusoid.to(torch.float64).chunk(2, dim=1)
        sinusoid_dot = torch.cat([-sin_part * angle_dot, cos_part * angle_dot], dim=1).to(wide)
        first, _, second = self.time_embedding
        hidden = _linear_in_dtype(first, sinusoid, wide)
        hidden_dot = silu_tangent(hidden, _linear_in_dtype(first, sinusoid_dot, wide, with_bias=False))
        time_BD_dot = _linear_in_dtype(second, hidden_dot, wide, with_bias=False)
        projected_dot = silu_tangent(time_BD, time_BD_dot)
        time_B6D_dot = _linear_in_dtype(self.time_projection[1], projected_dot, wide, with_bias=False)
        return time_BD_dot, time_B6D_dot.unflatten(1, (6, self.config.dim))

    def _time_embedding(self, sinusoid: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
        """time_embedding (Linear–SiLU–Linear) with its weights cast to the wide dtype."""
        first, activation, second = self.time_embedding
        return _linear_in_dtype(second, activation(_linear_in_dtype(first, sinusoid, wide)), wide)

    def _unpatchify(self, patches_BLP: torch.Tensor, grid_THW: tuple[int, ...]) -> torch.Tensor:
        """(B, T'·H'·W', pt·ph·pw·C) token patches, channel last in each patch, to (B, C, T, H, W)."""
        (t, h, w), (pt, ph, pw) = grid_THW, self.config.patch_size
        channels = self.config.out_channels
        video = patches_BLP.reshape(patches_BLP.shape[0], t, h, w, pt, ph, pw, channels)
        return video.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(patches_BLP.shape[0], channels, t * pt, h * ph, w * pw)

    def _check_inputs(self, x_BCTHW: torch.Tensor, timestep_B: torch.Tensor, context_BLD: torch.Tensor) -> None:
        """Raise one clear sentence when the inputs do not fit this model's configuration."""
        config = self.config
        if x_BCTHW.dim() != 5 or x_BCTHW.shape[1] != config.in_channels:
            raise ValueError(
                f"WanDiT expects x of shape (B, {config.in_channels}, T, H, W); got {tuple(x_BCTHW.shape)}.")
        if any(size % patch for size, patch in zip(x_BCTHW.shape[2:], config.patch_size)):
            raise ValueError(f"WanDiT needs T, H, W of x {tuple(x_BCTHW.shape[2:])} divisible by patch_size "
                             f"{config.patch_size}; crop or pad the latent.")
        batch = x_BCTHW.shape[0]
        if timestep_B.shape != (batch,):
            raise ValueError(f"WanDiT expects one timestep per sample, shape ({batch},); got {tuple(timestep_B.shape)} "
                             "(use t.expand(batch) for a shared time).")
        if context_BLD.dim() != 3 or context_BLD.shape[0] != batch or context_BLD.shape[2] != config.text_dim:
            raise ValueError(f"WanDiT expects context of shape ({batch}, L, {config.text_dim}); "
                             f"got {tuple(context_BLD.shape)}.")
        if context_BLD.shape[1] > config.text_len:
            raise ValueError(f"WanDiT context has {context_BLD.shape[1]} tokens, more than text_len={config.text_len}; "
                             "truncate the text embeddings.")


def build_wan_dit(config: WanDiTConfig | Mapping[str, Any]) -> WanDiT:
    """A WanDiT from a config or a mapping of WanDiTConfig fields (e.g. a configs/model/*.yaml file's content)."""
    if not isinstance(config, WanDiTConfig):
        known = {f.name for f in fields(WanDiTConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown WanDiTConfig keys {unknown}; valid keys are {sorted(known)}.")
        config = WanDiTConfig(**dict(config))
    return WanDiT(config)


__all__ = ["WanDiTConfig", "WanDiT", "build_wan_dit", "sinusoidal_time_embedding", "rope_cos_sin", "apply_rope"]
