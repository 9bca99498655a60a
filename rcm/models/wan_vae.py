"""Wan2.1 causal 3D video VAE, with the parameter names and shapes of the official `Wan2.1_VAE.pth`.

A video (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k frames maps to a latent (B, 16, 1 + k, H/8, W/8): the
first frame becomes a latent frame of its own (an image), every later group of 4 frames one more.
Every temporal convolution is causal (output frame t sees input frames ≤ t only), so a video can be run
in time chunks that carry each convolution's last input frames forward in a cache: `encode` takes the
first frame, then 4 frames at a time, `decode` one latent frame at a time. That keeps activations for
81-frame 480p/720p videos small, and gives the same numbers as running the whole video at once
(`chunked=False`, the reference the tests compare against).

Plain PyTorch: no parallelism. `load_wan_vae` reads the official checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcm.torch_files import read_torch_file

# Per-channel mean and standard deviation of the 16 latent channels, copied from the `WanVAE` wrapper
# in Wan2.1's wan/modules/vae.py. The Wan DiTs are trained on latents normalized as (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
OFFICIAL_CHECKPOINT_NAME = "Wan2.1_VAE.pth"
# Prefixes that training frameworks put in front of the VAE's keys, beyond the generic wrapper prefixes.
VAE_KEY_PREFIXES = ("vae.",)

# State carried from one time chunk to the next: for each causal layer, the trailing frames it still needs.
ChunkCache = dict[nn.Module, torch.Tensor]


@dataclass
class WanVAEConfig:
    """Sizes of a Wan2.1 VAE; the defaults are the released model (the official `_video_vae` arguments)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temporal_downsample", "latent_mean", "latent_std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))  # YAML gives lists
        problems = []
        for name in ("dim", "z_dim", "num_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.dim_mult, tuple) or not self.dim_mult or not all(
                isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.dim_mult):
            problems.append(f"dim_mult must be a non-empty list of positive integers, got {self.dim_mult!r}.")
        elif not isinstance(self.temporal_downsample, tuple) or len(self.temporal_downsample) != len(self.dim_mult) - 1 \
                or not all(isinstance(flag, bool) for flag in self.temporal_downsample):
            problems.append(f"temporal_downsample must hold one true/false per downsampling stage, i.e. "
                            f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} booleans, got {self.temporal_downsample!r}.")
        if not isinstance(self.attn_scales, tuple):
            problems.append(f"attn_scales must be a list of resolution scales (e.g. [0.5]), got {self.attn_scales!r}.")
        if isinstance(self.z_dim, int):
            for name in ("latent_mean", "latent_std"):
                if not isinstance(getattr(self, name), tuple) or len(getattr(self, name)) != self.z_dim:
                    problems.append(f"{name} must hold z_dim = {self.z_dim} numbers, one per latent channel, "
                                    f"got {getattr(self, name)!r}.")
            if isinstance(self.latent_std, tuple) and not all(s > 0 for s in self.latent_std):
                problems.append(f"latent_std must be positive, got {self.latent_std!r}.")
        if problems:
            raise ValueError("Invalid WanVAEConfig: " + " ".join(problems))

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along height and along width (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the latent of a video with these sizes (81×480×832 → 16×21×60×104)."""
        return (self.z_dim, 1 + (num_frames - 1) // self.temporal_compression,
                height // self.spatial_compression, width // self.spatial_compression)


# ----------------------------------------------------------------------------------------------------
# layers


class CausalConv3d(nn.Conv3d):
    """3D convolution padded only on the past side of time, so output frame t sees input frames ≤ t.

    `padding` is given as for nn.Conv3d; its temporal part p becomes 2p frames before the clip and none
    after. Those past frames are zeros at the start of the video, or the frames cached from the last chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        kernel_size = _three(kernel_size)
        padding = _three(padding)
        # Height and width are zero-padded by the convolution itself; time is padded in forward.
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, padding[1], padding[2]))
        self.past_frames = 2 * padding[0]

    def forward(self, x_BCTHW: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """Convolve a clip; with a cache, continue from the previous chunk and remember this one's last frames."""
        if self.past_frames:
            past = cache.get(self) if cache is not None else None
            if past is None:
                batch, channels, _, height, width = x_BCTHW.shape
                past = x_BCTHW.new_zeros(batch, channels, self.past_frames, height, width)
            x_BCTHW = torch.cat([past, x_BCTHW], dim=2)
            if cache is not None:
                # clone: a view would keep the whole concatenated chunk alive.
                cache[self] = x_BCTHW[:, :, -self.past_frames:].clone()
        return super().forward(x_BCTHW)


class RMSNorm(nn.Module):
    """RMS normalization over channels (dim 1) with a learned per-channel gain, as Wan's `RMS_norm`."""

    def __init__(self, channels: int, dims_after_channels: int):
        super().__init__()
        self.scale = channels**0.5  # F.normalize divides by the L2 norm; √C turns that into the RMS
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * dims_after_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x over channels) · gamma."""
        return F.normalize(x, dim=1) * self.scale * self.gamma


class NearestUpsample2x(nn.Module):
    """Each pixel becomes a 2×2 block (= nearest-exact interpolation by 2, exact in any dtype)."""

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, 2H, 2W)."""
        return x_NCHW.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


class ResidualBlock(nn.Module):
    """Two causal 3×3×3 convolutions, each after RMSNorm and SiLU, plus a (1×1×1 when widening) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_channels, 3), nn.SiLU(), CausalConv3d(in_channels, out_channels, 3, padding=1),
            RMSNorm(out_channels, 3), nn.SiLU(),
            nn.Identity(),  # the release has Dropout(0.0) here; the placeholder keeps the next conv at index 6
            CausalConv3d(out_channels, out_channels, 3, padding=1))
        self.shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BCTHW: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """Residual branch plus shortcut."""
        return _apply_layers(self.residual, x_BCTHW, cache) + self.shortcut(x_BCTHW)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (frames do not attend to each other)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, 2)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCTHW: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """x + attention(x), frame by frame; the cache is unused (nothing crosses frames)."""
        batch, channels, frames, height, width = x_BCTHW.shape
        x_NCHW = _frames_as_batch(x_BCTHW)
        qkv_N3LC = self.to_qkv(self.norm(x_NCHW)).reshape(-1, 3, channels, height * width).transpose(-1, -2)
        q_NLC, k_NLC, v_NLC = qkv_N3LC.unbind(dim=1)
        out_NLC = F.scaled_dot_product_attention(q_NLC, k_NLC, v_NLC)
        out_NCHW = self.proj(out_NLC.transpose(-1, -2).reshape(-1, channels, height, width))
        return x_BCTHW + _batch_as_frames(out_NCHW, batch)


class Resample(nn.Module):
    """2× spatial down- or upsampling of each frame, plus 2× in time for the '3d' modes.

    Time follows the first-frame rule of the Wan VAE: the video's first frame is an image and keeps one
    frame of its own at every scale; only the frames after it are merged in pairs (down) or split in two
    (up).
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, channels: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode
        if mode.startswith("downsample"):
            # Padding right and bottom only makes the stride-2 3×3 convolution halve even sizes exactly.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        else:
            # Upsampling also halves the channels (the decoder's next block expects channels // 2).
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(channels, channels // 2, 3, padding=1))
        if mode == "downsample3d":
            # No causal padding: each output frame sees the previous chunk's last frame and two new ones.
            self.time_conv = CausalConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            # Twice the channels, split into two output frames per input frame.
            self.time_conv = CausalConv3d(channels, channels * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x_BCTHW: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """Resample a clip; with a cache, continue the video from the previous chunk."""
        if self.mode == "upsample3d":
            x_BCTHW = self._upsample_time(x_BCTHW, cache)
        x_BCTHW = _batch_as_frames(self.resample(_frames_as_batch(x_BCTHW)), x_BCTHW.shape[0])
        if self.mode == "downsample3d":
            x_BCTHW = self._downsample_time(x_BCTHW, cache)
        return x_BCTHW

    def _downsample_time(self, x_BCTHW: torch.Tensor, cache: ChunkCache | None) -> torch.Tensor:
        previous = cache.get(self) if cache is not None else None
        if cache is not None:
            cache[self] = x_BCTHW[:, :, -1:].clone()
        if previous is None:  # start of the video: frame 0 passes through, frames (0,1,2), (2,3,4), ... merge
            outputs, context = [x_BCTHW[:, :, :1]], x_BCTHW
        else:
            outputs, context = [], torch.cat([previous, x_BCTHW], dim=2)
        if context.shape[2] >= 3:
            outputs.append(self.time_conv(context))
        return torch.cat(outputs, dim=2)

    def _upsample_time(self, x_BCTHW: torch.Tensor, cache: ChunkCache | None) -> torch.Tensor:
        batch, channels, _, height, width = x_BCTHW.shape
        at_video_start = cache is None or self.time_conv not in cache
        outputs = []
        if at_video_start:
            outputs.append(x_BCTHW[:, :, :1])
            x_BCTHW = x_BCTHW[:, :, 1:]
            if cache is not None:
                # The later frames' temporal context starts from zeros, not from the first (image) frame, as
                # the release does; seeding the cache also marks that the first frame is done.
                cache[self.time_conv] = x_BCTHW.new_zeros(batch, channels, self.time_conv.past_frames, height, width)
        if x_BCTHW.shape[2]:
            pairs_B2CTHW = self.time_conv(x_BCTHW, cache).unflatten(1, (2, channels))
            frames = pairs_B2CTHW.shape[3]
            # Output frame 2t + j is half j of the channels at input frame t.
            outputs.append(pairs_B2CTHW.permute(0, 2, 3, 1, 4, 5).reshape(batch, channels, 2 * frames, height, width))
        return torch.cat(outputs, dim=2)


def _three(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


def _frames_as_batch(x_BCTHW: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) → (B·T, C, H, W), batch-major."""
    batch, channels, frames, height, width = x_BCTHW.shape
    return x_BCTHW.transpose(1, 2).reshape(batch * frames, channels, height, width)


def _batch_as_frames(x_NCHW: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·T, C, H, W) → (B, C, T, H, W)."""
    return x_NCHW.unflatten(0, (batch, -1)).transpose(1, 2)


def _apply_layers(layers: nn.Sequential, x: torch.Tensor, cache: ChunkCache | None) -> torch.Tensor:
    """Run layers in order, handing the chunk cache to those that keep temporal state."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)) else layer(x)
    return x


# ----------------------------------------------------------------------------------------------------
# encoder, decoder, VAE


class Encoder3d(nn.Module):
    """Video (B, 3, T, H, W) → posterior mean and log-variance features (B, 2·z_dim, T', H/8, W/8)."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        widths = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], 3, padding=1)
        blocks = []
        scale = 1.0  # resolution relative to the input, what attn_scales refers to
        for stage, (channels, out_channels) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(channels, out_channels))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_channels))
                channels = out_channels
            if stage < len(config.dim_mult) - 1:
                blocks.append(Resample(out_channels, "downsample3d" if config.temporal_downsample[stage] else "downsample2d"))
                scale /= 2
        self.downsamples = nn.Sequential(*blocks)
        width = widths[-1]
        self.middle = nn.Sequential(ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width))
        self.head = nn.Sequential(RMSNorm(width, 3), nn.SiLU(), CausalConv3d(width, 2 * config.z_dim, 3, padding=1))

    def forward(self, video_BCTHW: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """Encode a clip (with a cache: the next chunk of a video)."""
        x = self.conv1(video_BCTHW, cache)
        for layers in (self.downsamples, self.middle, self.head):
            x = _apply_layers(layers, x, cache)
        return x


class Decoder3d(nn.Module):
    """Latent (B, z_dim, T', H', W') → video (B, 3, 1 + 4(T' − 1), 8H', 8W'), not clamped."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        widths = [config.dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, widths[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(widths[0], widths[0]), AttentionBlock(widths[0]),
                                    ResidualBlock(widths[0], widths[0]))
        blocks = []
        channels = widths[0]
        # The release labels the deepest decoder stage 1/2^(stages-2), one step finer than the encoder's;
        # kept so that a non-empty attn_scales places attention where the official layout has it.
        scale = 1.0 / 2 ** (len(config.dim_mult) - 2)
        for stage, out_channels in enumerate(widths[1:]):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(channels, out_channels))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_channels))
                channels = out_channels
            if stage < len(config.dim_mult) - 1:
                blocks.append(Resample(out_channels, "upsample3d" if temporal_upsample[stage] else "upsample2d"))
                channels = out_channels // 2
                scale *= 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(channels, 3), nn.SiLU(), CausalConv3d(channels, 3, 3, padding=1))

    def forward(self, latent_BCTHW: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """Decode latent frames (with a cache: the next frames of a video)."""
        x = self.conv1(latent_BCTHW, cache)
        for layers in (self.middle, self.upsamples, self.head):
            x = _apply_layers(layers, x, cache)
        return x


class WanVAE(nn.Module):
    """The Wan2.1 video VAE (official `WanVAE_` layout): `encode` to normalized latents, `decode` to video."""

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else WanVAEConfig()
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # encoder features → (mean, log-variance)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)  # latent → decoder input
        self.decoder = Decoder3d(config)

    def num_parameters(self) -> int:
        """Number of parameter elements."""
        return sum(p.numel() for p in self.parameters())

    def encode(self, video_BCTHW: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """Video in [-1, 1] (B, 3, 1 + 4k, H, W) → normalized posterior mean (B, z_dim, 1 + k, H/8, W/8).

        `chunked` runs the first frame, then 4 frames at a time through a cache (low memory); `chunked=False`
        runs the whole video at once (same result up to float rounding).
        """
        self._check_video(video_BCTHW)
        video_BCTHW = video_BCTHW.to(self.conv1.weight.dtype)
        if chunked:
            cache: ChunkCache = {}
            step = self.config.temporal_compression
            chunks = [video_BCTHW[:, :, :1], *video_BCTHW[:, :, 1:].split(step, dim=2)]
            features = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        else:
            features = self.encoder(video_BCTHW)
        mean_BCTHW, _log_variance = self.conv1(features).chunk(2, dim=1)
        latent_mean, latent_std = self._latent_statistics(mean_BCTHW)
        return (mean_BCTHW - latent_mean) / latent_std

    def decode(self, latent_BCTHW: torch.Tensor, chunked: bool = True, chunk_frames: int = 1) -> torch.Tensor:
        """Normalized latent (B, z_dim, T', H', W') → video (B, 3, 1 + 4(T' − 1), 8H', 8W') clamped to [-1, 1].

        `chunked` decodes `chunk_frames` latent frames at a time through a cache (1, as Wan: least memory;
        more: larger, faster convolutions); `chunked=False` decodes all frames at once (same result up to
        float rounding).
        """
        if chunk_frames < 1:
            raise ValueError(f"WanVAE.decode: chunk_frames must be at least 1, got {chunk_frames}.")
        if latent_BCTHW.dim() != 5 or latent_BCTHW.shape[1] != self.config.z_dim:
            raise ValueError(f"WanVAE.decode expects a latent (B, {self.config.z_dim}, T, H, W), "
                             f"got shape {tuple(latent_BCTHW.shape)}.")
        latent_BCTHW = latent_BCTHW.to(self.conv1.weight.dtype)
        latent_mean, latent_std = self._latent_statistics(latent_BCTHW)
        x = self.conv2(latent_BCTHW * latent_std + latent_mean)
        if chunked:
            cache: ChunkCache = {}
            video = torch.cat([self.decoder(chunk, cache) for chunk in x.split(chunk_frames, dim=2)], dim=2)
        else:
            video = self.decoder(x)
        return video.clamp(-1.0, 1.0)

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latent_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.config.latent_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def _check_video(self, video_BCTHW: torch.Tensor) -> None:
        step, pixels = self.config.temporal_compression, self.config.spatial_compression
        shape = tuple(video_BCTHW.shape)
        if len(shape) != 5 or shape[1] != 3 or (shape[2] - 1) % step or shape[3] % pixels or shape[4] % pixels:
            raise ValueError(
                f"WanVAE.encode expects an RGB video (B, 3, T, H, W) with T = 1 + {step}k frames (e.g. 81) and "
                f"H, W divisible by {pixels}; got shape {shape}. Trim or pad the video to such a size.")


def load_wan_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 config: WanVAEConfig | None = None) -> WanVAE:
    """The VAE with weights from an official `Wan2.1_VAE.pth` (strict), frozen, in eval mode, on `device` in `dtype`."""
    # Deferred: the checkpoint package pulls in distributed machinery that the model itself does not need.
    from rcm.checkpoint.weights import raise_on_mismatch, unwrap_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No Wan VAE checkpoint at {path}. Expected {OFFICIAL_CHECKPOINT_NAME} from the Wan2.1 release "
            f"(it ships with every Wan2.1 model, e.g. Wan-AI/Wan2.1-T2V-1.3B); pass its path.")
    state = read_torch_file(path, "Wan VAE weights", dict,
                            f"a state dict (expected {OFFICIAL_CHECKPOINT_NAME} from the Wan2.1 release)")
    state = unwrap_state_dict(state, prefer_ema=False, extra_prefixes=VAE_KEY_PREFIXES)
    # Built on the meta device and filled by assignment: no time spent on a random initialization.
    with torch.device("meta"):
        model = WanVAE(config)
    raise_on_mismatch(model.state_dict(), state,
                      source=f"{path} (expected the Wan2.1 VAE, {OFFICIAL_CHECKPOINT_NAME} from the Wan2.1 release)")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
