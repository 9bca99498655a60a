"""The umT5 text encoder of Wan2.1, with the parameter names and shapes of the official
`models_t5_umt5-xxl-enc-bf16.pth`, so that file loads with ``load_state_dict(strict=True)``.

T5 differs from a textbook transformer in ways that are easy to get wrong, so they are listed here:
- the norms are RMS norms without mean subtraction or bias, computed in at least float32;
- attention scores are not scaled by 1/sqrt(head_dim) (T5 folds that factor into the initialisation);
- positions enter only as a learned bias per head on the attention scores, looked up by a bucket of the
  relative distance (exact for short distances, logarithmic up to ``RELATIVE_MAX_DISTANCE``);
  umT5 gives every layer its own bias table (``shared_pos=False``), T5 1.1 shares one;
- the feed-forward is gated: fc2(fc1(x) · gelu_tanh(gate(x))), no biases anywhere;
- padding tokens are masked out as keys only, so real tokens never see them.
Dropout is left out: the encoder is only used for inference.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from rcm.torch_files import read_torch_file

logger = logging.getLogger(__name__)

OFFICIAL_CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
UMT5_XXL_PARAMETER_COUNT = 5_680_910_336
RELATIVE_MAX_DISTANCE = 128  # distances at or beyond this share the last bucket (T5's max_distance)
NORM_EPS = 1e-6
CHECKPOINT_PREFIXES = ("encoder.",)  # beyond the generic wrapper prefixes, what other exports put before the names


@dataclass
class UMT5Config:
    """Sizes of a umT5 encoder; the defaults are umT5-XXL as Wan2.1 uses it (`umt5_xxl` in the official code)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}.")
        if not problems:
            if self.dim_attn % self.num_heads:
                problems.append(f"dim_attn ({self.dim_attn}) must be divisible by num_heads ({self.num_heads}).")
            # The encoder's buckets are bidirectional: half for keys before the query, half after.
            if self.num_buckets % 2 or self.num_buckets < 4:
                problems.append(f"num_buckets must be even and at least 4, got {self.num_buckets}.")
        if problems:
            raise ValueError("Invalid UMT5Config: " + " ".join(problems))

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim_attn // self.num_heads


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int,
                             max_distance: int = RELATIVE_MAX_DISTANCE) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position (key index − query index), as int64.

    Half of the buckets serve keys after the query, half keys at or before it. Within a half, the first
    half of the buckets hold the distances 0, 1, … exactly; the rest cover the distances up to
    ``max_distance`` on a log scale, and anything farther lands in the last bucket.
    """
    buckets_per_side = num_buckets // 2
    side_offset = (relative_position > 0).long() * buckets_per_side
    distance = relative_position.abs()
    exact_limit = buckets_per_side // 2
    # float64 keeps the exact boundaries (16, 32, 64 for the XXL sizes) on the right side of the floor;
    # for every distance below 2000 it gives the same buckets as the official float32 formula.
    log_ratio = torch.log(distance.double().clamp(min=1) / exact_limit) / math.log(max_distance / exact_limit)
    far_bucket = exact_limit + (log_ratio * (buckets_per_side - exact_limit)).long()
    far_bucket = far_bucket.clamp(max=buckets_per_side - 1)
    return side_offset + torch.where(distance < exact_limit, distance, far_bucket)


def _clamp_float16_overflow(x: torch.Tensor) -> torch.Tensor:
    # The official encoder clamps float16 activations that overflowed, so a float16 run still gives numbers.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(min=-limit, max=limit)
    return x


class T5LayerNorm(nn.Module):
    """T5's RMS norm: x / rms(x) · weight, no mean subtraction and no bias, the statistic in float32 or wider."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``x`` in the weight's dtype (or wider, when the weight is float32/64)."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed


class T5RelativePositionBias(nn.Module):
    """A learned attention bias per head for each relative-position bucket."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """The bias of every (query, key) pair of a ``length``-token sequence: (1, heads, length, length)."""
        device = self.embedding.weight.device
        positions = torch.arange(length, device=device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling, with an additive position bias and a key mask."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, bias_BNLL: torch.Tensor) -> torch.Tensor:
        """Attention output (B, L, D); ``bias_BNLL`` holds the position bias and −inf-like masked keys."""
        batch, length, _ = x_BLD.shape
        q, k, v = (projection(x_BLD).view(batch, length, self.num_heads, -1).transpose(1, 2)
                   for projection in (self.q, self.k, self.v))
        # Written out rather than through rcm.ops.attention: T5 needs an additive bias and no 1/sqrt(d)
        # scaling, and the official encoder's numerics (scores in the model dtype, softmax in float32) are
        # kept so embeddings match the ones Wan's DiT was trained on (float64 stays float64, for tests).
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias_BNLL
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        weights = weights.to(scores.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1)
        return self.o(out)


class T5GatedFeedForward(nn.Module):
    """fc2(fc1(x) · gelu_tanh(gate(x))); ``gate`` is a Sequential so its weight is named ``gate.0.weight``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """The feed-forward output (B, L, D)."""
        return self.fc2(self.fc1(x_BLD) * gelu_tanh(self.gate(x_BLD)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, evaluated op by op in x's dtype like the official encoder (bf16-exact)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class UMT5Block(nn.Module):
    """Pre-norm self-attention then pre-norm gated feed-forward, each with a residual connection."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(config.dim)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5LayerNorm(config.dim)
        self.ffn = T5GatedFeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = None if config.shared_pos else T5RelativePositionBias(config.num_buckets,
                                                                                   config.num_heads)

    def forward(self, x_BLD: torch.Tensor, key_mask_B11L: torch.Tensor | None,
                shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output (B, L, D); ``key_mask_B11L`` is True at real tokens (None: no padding)."""
        position_bias = self.pos_embedding(x_BLD.shape[1]) if self.pos_embedding is not None else shared_bias
        bias = attention_bias(position_bias.to(x_BLD.dtype), key_mask_B11L, x_BLD.shape[0])
        x_BLD = _clamp_float16_overflow(x_BLD + self.attn(self.norm1(x_BLD), bias))
        return _clamp_float16_overflow(x_BLD + self.ffn(self.norm2(x_BLD)))


def attention_bias(position_bias_1NLL: torch.Tensor, key_mask_B11L: torch.Tensor | None,
                   batch: int) -> torch.Tensor:
    """Position bias with masked keys set to the dtype's most negative value: (B, heads, L, L)."""
    bias = position_bias_1NLL.expand(batch, -1, -1, -1)
    if key_mask_B11L is None:
        return bias
    # The dtype's minimum rather than −inf: a row whose keys were all masked still softmaxes to numbers.
    return bias.masked_fill(~key_mask_B11L, torch.finfo(bias.dtype).min)


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack: token embedding, ``num_layers`` blocks, final RMS norm (no dropout)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        # T5 1.1 shares one bias table across layers and stores it here; umT5 keeps one per block.
        self.pos_embedding = T5RelativePositionBias(config.num_buckets, config.num_heads) if config.shared_pos else None
        self.blocks = nn.ModuleList(UMT5Block(config) for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim)

    def forward(self, token_ids_BL: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L, dim) of every position; ``mask_BL`` is nonzero at real tokens, 0 at padding.

        Padding positions get outputs too (they attend to the real tokens); callers discard them.
        """
        x_BLD = self.token_embedding(token_ids_BL)
        key_mask_B11L = None if mask_BL is None else (mask_BL != 0)[:, None, None, :]
        shared_bias = self.pos_embedding(token_ids_BL.shape[1]) if self.pos_embedding is not None else None
        for block in self.blocks:
            x_BLD = block(x_BLD, key_mask_B11L, shared_bias)
        return self.norm(x_BLD)


def umt5_state_dict_from_checkpoint(state: dict, source: str) -> dict[str, torch.Tensor]:
    """The encoder's entries of a loaded checkpoint: a ``state_dict``/``model`` sub-dict and wrapper prefixes
    (``model.``, ``encoder.``, ...) are removed (each only when every key carries it)."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict of the umT5 encoder")
    # Imported here: rcm.checkpoint pulls in torch.distributed, which the model itself never needs.
    from rcm.checkpoint.weights import unwrap_state_dict

    return unwrap_state_dict(state, prefer_ema=False, extra_prefixes=CHECKPOINT_PREFIXES)


def load_umt5_encoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: UMT5Config | None = None,
) -> UMT5Encoder:
    """The umT5 encoder with the weights of ``path`` (strict), on ``device`` in ``dtype``, in eval mode.

    ``config`` defaults to umT5-XXL, the official `models_t5_umt5-xxl-enc-bf16.pth`. The model is built on
    the meta device and takes the memory-mapped tensors with ``assign=True``, so the 11 GB file is never
    held twice in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"umT5 encoder checkpoint {path} does not exist. Wan2.1 ships it as {OFFICIAL_CHECKPOINT_NAME} "
            "in its model release (e.g. the Wan2.1-T2V-1.3B or Wan2.1-T2V-14B folder); pass that file's path.")
    config = config or UMT5Config()
    with torch.device("meta"):
        encoder = UMT5Encoder(config)
    logger.info("loading the umT5 encoder from %s", path)
    state = read_torch_file(path, "umT5 encoder weights", dict,
                            f"a state dict of the umT5 encoder (the official file is {OFFICIAL_CHECKPOINT_NAME})")
    state = umt5_state_dict_from_checkpoint(state, str(path))

    # Imported here: rcm.checkpoint pulls in torch.distributed, which the model itself never needs.
    from rcm.checkpoint.weights import raise_on_mismatch
    try:
        raise_on_mismatch(encoder.state_dict(), state, source=str(path))
    except ValueError as error:
        raise ValueError(f"{error}. Expected a umT5 encoder with {asdict(config)} "
                         f"(the official file is {OFFICIAL_CHECKPOINT_NAME}).") from None
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)
