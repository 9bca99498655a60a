"""Plug-in metrics that need pretrained weights (FVD, CLIP score, ...): a registry and one built-in.

A plug-in is a class registered under a name::

    @register_metric("fvd")
    class FrechetVideoDistance:
        def __init__(self, weights_path: Path): ...            # load the local weights; never download
        def update(self, samples: torch.Tensor, prompts: list[str]) -> None: ...   # samples (N,C,T,H,W)
        def compute(self) -> dict[str, float]: ...              # named scalars for the report

and chosen on the command line with ``--metric NAME=/local/path/to/weights``. Nothing is fetched at run
time: a path that does not exist fails at start with the metric's name and the path. One instance sees
every sample of one sampler setting (all prompts), then `compute` is called once.

Built-in: ``latent_stats`` — the Fréchet distance between Gaussian fits of the samples' features and of
reference latents, whose statistics file `save_latent_statistics` writes. Features are the latents
averaged over H and W (C·T numbers per sample), so the covariance stays small for video-sized latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from rcm.torch_files import read_torch_file

LATENT_STATS_FORMAT = "rcm-latent-stats-v1"


@runtime_checkable
class SampleMetric(Protocol):
    """What a plug-in metric provides (see the module doc)."""

    def __init__(self, weights_path: Path) -> None: ...

    def update(self, samples: torch.Tensor, prompts: list[str]) -> None: ...

    def compute(self) -> dict[str, float]: ...


_REGISTRY: dict[str, type] = {}


class MetricWeightsError(FileNotFoundError):
    """A plug-in metric's weights file is missing."""


def register_metric(name: str) -> Callable[[type], type]:
    """Class decorator: make a plug-in metric available to ``--metric NAME=PATH``."""

    def register(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a metric named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = cls
        return cls

    return register


def registered_metrics() -> list[str]:
    """Names of the registered plug-in metrics."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class MetricSpec:
    """A plug-in metric chosen on the command line: its name and the local path of its weights."""

    name: str
    weights_path: Path

    def build(self) -> SampleMetric:
        """A fresh instance of the metric with its weights loaded."""
        return _REGISTRY[self.name](self.weights_path)


def parse_metric_spec(text: str) -> MetricSpec:
    """Check a ``NAME=PATH`` option: the name is registered and the weights exist locally."""
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise ValueError(f"--metric {text!r}: expected NAME=/local/path/to/weights (registered: {', '.join(registered_metrics())})")
    if name not in _REGISTRY:
        raise ValueError(f"--metric {text!r}: no metric named {name!r} is registered (registered: {', '.join(registered_metrics())})")
    weights_path = Path(path).expanduser()
    if not weights_path.exists():
        raise MetricWeightsError(
            f"metric {name!r}: weights {weights_path} do not exist. Nothing is downloaded at run time: put the "
            f"weights at that path (or fix it) and run again"
        )
    return MetricSpec(name, weights_path)


def latent_features(latents: torch.Tensor) -> torch.Tensor:
    """Features (N, C·T) of latents (N,C,T,H,W): the mean over H and W, in float64."""
    latents = torch.as_tensor(latents)
    if latents.ndim != 5:
        raise ValueError(f"latent features need latents of shape (N, C, T, H, W), got {tuple(latents.shape)}")
    return latents.detach().to("cpu", torch.float64).mean(dim=(3, 4)).flatten(1)


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) of features (N, D), with the unbiased N − 1 normalization."""
    if len(features) < 2:
        raise ValueError(f"a Gaussian fit needs at least two samples, got {len(features)}")
    mean = features.mean(dim=0)
    centered = features - mean
    return mean, centered.T @ centered / (len(features) - 1)


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Fréchet (W2²) distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½, with the matrix square roots from symmetric
    eigendecompositions (negative eigenvalues from round-off clipped to 0).
    """
    mean_a, mean_b, cov_a, cov_b = (t.to(torch.float64) for t in (mean_a, mean_b, cov_a, cov_b))
    values, vectors = torch.linalg.eigh((cov_a + cov_a.T) / 2)
    sqrt_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    cross_trace = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross_trace
    return float(distance.clamp_min(0))


def save_latent_statistics(latents: torch.Tensor, path: str | Path) -> Path:
    """Write the reference statistics file of `latent_stats` from reference latents (N,C,T,H,W)."""
    mean, covariance = gaussian_fit(latent_features(latents))
    path = Path(path)
    torch.save({"format": LATENT_STATS_FORMAT, "mean": mean, "covariance": covariance, "count": len(latents)}, path)
    return path


@register_metric("latent_stats")
class LatentStatistics:
    """Fréchet distance between the Gaussian fit of the samples' latent features and a reference fit."""

    def __init__(self, weights_path: Path):
        reference = read_torch_file(weights_path, "metric 'latent_stats':", dict, "a statistics dict", mmap=False)
        if reference.get("format") != LATENT_STATS_FORMAT:
            raise ValueError(
                f"metric 'latent_stats': {weights_path} is not a statistics file written by "
                "rcm.eval.metrics_plugins.save_latent_statistics"
            )
        self.reference_mean = reference["mean"]
        self.reference_covariance = reference["covariance"]
        self.features: list[torch.Tensor] = []

    def update(self, samples: torch.Tensor, prompts: list[str]) -> None:
        """Collect the features of a batch of samples (the prompts are not used)."""
        self.features.append(latent_features(samples))

    def compute(self) -> dict[str, float]:
        """{"latent_frechet": distance} over every sample seen."""
        features = torch.cat(self.features)
        if features.shape[1] != self.reference_mean.shape[0]:
            raise ValueError(
                f"metric 'latent_stats': samples have {features.shape[1]} features (C·T), the reference statistics "
                f"{self.reference_mean.shape[0]}; write statistics from latents of the same shape"
            )
        mean, covariance = gaussian_fit(features)
        return {"latent_frechet": frechet_distance(mean, covariance, self.reference_mean, self.reference_covariance)}
