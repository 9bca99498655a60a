"""A class-conditional mixture of Gaussians in a small latent "video" shape: toy data with known ground truth.

Class k has `modes_per_class` Gaussian modes. A mode mean μ ∈ R^{C×T} ~ N(0, 1) is broadcast over H, W
(so a DiT without absolute position embedding can still learn it); within a mode every element is
i.i.d. N(0, mode_std²). Each class also has a fixed text embedding and prompt, like real text-to-video data.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rcm.atomic_files import atomic_torch_save
from rcm.data.shards import SHARD_NAME, write_shards
from rcm.torch_files import TorchFileError, read_torch_file

GROUND_TRUTH_FILE = "ground_truth.pt"
NEGATIVE_EMBEDDING_FILE = "negative_embedding.pt"
_FORMAT_VERSION = 1
_MAX_MODE_DRAWS = 1000


@dataclass
class ToyMixtureConfig:
    """Shape and randomness of the toy mixture."""

    num_classes: int = 8
    modes_per_class: int = 3
    latent_shape: tuple[int, int, int, int] = (4, 2, 8, 8)  # (C, T, H, W)
    text_len: int = 8
    text_dim: int = 32
    mode_std: float = 0.25
    seed: int = 0
    min_mode_weight: float = 0.15

    def __post_init__(self):
        self.latent_shape = tuple(int(size) for size in self.latent_shape)
        if len(self.latent_shape) != 4 or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be four positive sizes (C, T, H, W), got {self.latent_shape}")
        for name in ("num_classes", "modes_per_class", "text_len", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mode_std <= 0:
            raise ValueError(f"mode_std must be positive, got {self.mode_std}")
        if self.min_mode_weight < 0 or self.min_mode_weight * self.modes_per_class > 1:
            raise ValueError(
                f"min_mode_weight × modes_per_class must lie in [0, 1], got {self.min_mode_weight} × {self.modes_per_class}"
            )


class ToyMixture:
    """The ground truth: mode means, mode weights, per-class text embeddings, prompts, a negative embedding.

    Precision radius: a true sample lies at distance ≈ mode_std·sqrt(D) from its mode (D = latent numel,
    the norm of D i.i.d. N(0, mode_std²) entries, spread only ≈ 0.7·mode_std), so a ball of radius
    `radius_factor`·mode_std·sqrt(D) with radius_factor = 1.5 holds essentially all true samples. Two modes
    are ≈ sqrt(2·D) apart (mean differences ~ N(0, 2) per element); mode means of a class are drawn with
    rejection so that any two lie more than 2 radii apart, which makes the balls disjoint and the nearest
    mode of a precise sample unambiguous.
    """

    radius_factor = 1.5

    def __init__(self, config: ToyMixtureConfig | None = None):
        config = config if config is not None else ToyMixtureConfig()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        means = torch.empty(config.num_classes, config.modes_per_class, *config.latent_shape)
        weights = torch.empty(config.num_classes, config.modes_per_class)
        self.embeddings: list[torch.Tensor] = []
        for class_id in range(config.num_classes):
            for mode in range(config.modes_per_class):
                means[class_id, mode] = self._draw_separated_mean(means[class_id, :mode], generator)
            # Dirichlet(1) weights, mixed with the floor so every mode keeps at least min_mode_weight.
            raw = -torch.log(torch.rand(config.modes_per_class, generator=generator).clamp_min(1e-12))
            free = 1.0 - config.min_mode_weight * config.modes_per_class
            weights[class_id] = config.min_mode_weight + free * raw / raw.sum()
            length = int(torch.randint(max(1, config.text_len // 2), config.text_len + 1, (), generator=generator))
            self.embeddings.append(torch.randn(length, config.text_dim, generator=generator))
        self.means = means
        self.weights = weights
        self.negative_embedding = torch.randn(config.text_len, config.text_dim, generator=generator)
        self.prompts = [f"toy prompt {class_id}" for class_id in range(config.num_classes)]

    def _draw_separated_mean(self, others: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A mode mean (C,T,H,W), constant over H,W, more than 2 precision radii from each of `others`."""
        channels, frames, height, width = self.config.latent_shape
        for _ in range(_MAX_MODE_DRAWS):
            mean_CT = torch.randn(channels, frames, generator=generator)
            mean = mean_CT[:, :, None, None].expand(channels, frames, height, width).contiguous()
            if len(others) == 0:
                return mean
            distances = (others - mean).flatten(1).norm(dim=1)
            if distances.min() > 2 * self.precision_radius:
                return mean
        raise ValueError(
            f"could not place {self.config.modes_per_class} modes 2 precision radii apart; lower mode_std "
            f"({self.config.mode_std}) or modes_per_class"
        )

    @property
    def latent_numel(self) -> int:
        """Number of elements of one latent (D)."""
        return math.prod(self.config.latent_shape)

    @property
    def precision_radius(self) -> float:
        """L2 radius around a mode within which a sample counts as precise: radius_factor·mode_std·sqrt(D)."""
        return self.radius_factor * self.config.mode_std * math.sqrt(self.latent_numel)

    def sample_with_modes(
        self, class_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one latent per class id: (latents (N,C,T,H,W) float32, mode indices (N,) int64)."""
        class_ids = torch.as_tensor(class_ids, dtype=torch.int64).reshape(-1)
        if len(class_ids) and (class_ids.min() < 0 or class_ids.max() >= self.config.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.config.num_classes}), got {class_ids.tolist()[:10]}...")
        if len(class_ids) == 0:
            return torch.empty(0, *self.config.latent_shape), torch.empty(0, dtype=torch.int64)
        modes = torch.multinomial(self.weights[class_ids], 1, generator=generator).squeeze(1)
        noise = torch.randn(len(class_ids), *self.config.latent_shape, generator=generator)
        return self.means[class_ids, modes] + self.config.mode_std * noise, modes

    def sample(self, class_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one latent (N,C,T,H,W) float32 per class id."""
        return self.sample_with_modes(class_ids, generator)[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write the ground truth (config and all tensors) as a plain dict with torch.save."""
        state = {
            "format_version": _FORMAT_VERSION,
            "config": asdict(self.config),
            "means": self.means,
            "weights": self.weights,
            "embeddings": self.embeddings,
            "negative_embedding": self.negative_embedding,
            "prompts": self.prompts,
        }
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ToyMixture:
        """Read a ground truth written by `save`."""
        state = read_torch_file(path, "toy ground truth", dict, "the dict that ToyMixture.save writes", mmap=False)
        if state.get("format_version") != _FORMAT_VERSION:
            raise TorchFileError(f"toy ground truth {path} is not one written by ToyMixture.save (format_version "
                                 f"{state.get('format_version')!r}, expected {_FORMAT_VERSION})")
        mixture = cls.__new__(cls)
        mixture.config = ToyMixtureConfig(**state["config"])
        mixture.means = state["means"]
        mixture.weights = state["weights"]
        mixture.embeddings = list(state["embeddings"])
        mixture.negative_embedding = state["negative_embedding"]
        mixture.prompts = list(state["prompts"])
        return mixture


def _toy_samples(mixture: ToyMixture, num_samples: int, seed: int, chunk: int = 1024) -> Iterator[dict]:
    """Sample dicts {latent, embed, prompt} with classes drawn uniformly, generated in chunks."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_samples, chunk):
        count = min(chunk, num_samples - start)
        class_ids = torch.randint(mixture.config.num_classes, (count,), generator=generator)
        latents = mixture.sample(class_ids, generator)
        for class_id, latent in zip(class_ids.tolist(), latents):
            yield {"latent": latent, "embed": mixture.embeddings[class_id], "prompt": mixture.prompts[class_id]}


def write_toy_shards(
    mixture: ToyMixture, out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int, seed: int
) -> list[Path]:
    """Write `num_samples` mixture samples (uniform class prior) as training shards; returns the shard paths."""
    return write_shards(_toy_samples(mixture, num_samples, seed), out_dir, samples_per_shard)


def build_toy_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int,
    mixture_config: ToyMixtureConfig | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write toy shards plus `ground_truth.pt` and `negative_embedding.pt` into `out_dir`; returns the shard paths.

    Shards left by an earlier build in `out_dir` are removed first, so the directory holds exactly this data set.
    `ground_truth.pt` is written last: its presence marks a complete data set.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / GROUND_TRUTH_FILE).unlink(missing_ok=True)
    for stale in out_dir.glob(SHARD_NAME.replace("{:06d}", "*")):
        stale.unlink()
    mixture = ToyMixture(mixture_config)
    shards = write_toy_shards(mixture, out_dir, num_samples, samples_per_shard, seed)
    torch.save(mixture.negative_embedding, out_dir / NEGATIVE_EMBEDDING_FILE)
    mixture.save(out_dir / GROUND_TRUTH_FILE)
    return shards
