"""Ground-truth quality metrics of generated toy samples against the known modes of a ToyMixture."""
from __future__ import annotations

import torch

from rcm.data.toy import ToyMixture

HISTOGRAM_SMOOTHING = 1e-3
RECALL_WEIGHT_SHARE = 0.1


def toy_metrics(samples: torch.Tensor, class_ids: torch.Tensor, mixture: ToyMixture) -> dict:
    """Precision, recall and mode KL of samples (N,C,T,H,W) generated for class ids (N,), per class and averaged.

    Distances are L2 over the whole latent; every sample is assigned to the nearest mode of its own class.
    For a class k with n_k samples and modes m with true weights w_m:
      precision_k = share of the n_k samples within `mixture.precision_radius` of some mode of class k;
      recall_k    = share of the modes of class k that are hit: mode m is hit when at least
                    max(1, 0.1·w_m·n_k) of the precise samples are assigned to it;
      mode_kl_k   = KL(w ‖ q) with q the histogram of the nearest mode over all n_k samples, as frequencies
                    smoothed by adding 1e-3 to each bin and renormalized (so a missed mode costs a finite amount).
    Returned dict: "precision", "recall", "mode_kl" (unweighted means over the classes that have samples),
    "precision_per_class", "recall_per_class", "mode_kl_per_class" (lists, None for classes without
    samples), "samples_per_class" (list of int) and "num_samples".
    """
    config = mixture.config
    samples = torch.as_tensor(samples)
    class_ids = torch.as_tensor(class_ids, dtype=torch.int64).reshape(-1)
    if samples.ndim != 5 or tuple(samples.shape[1:]) != config.latent_shape:
        raise ValueError(f"samples must have shape (N, *{config.latent_shape}), got {tuple(samples.shape)}")
    if len(class_ids) != len(samples):
        raise ValueError(f"got {len(samples)} samples but {len(class_ids)} class ids")
    if len(class_ids) == 0:
        raise ValueError("toy_metrics needs at least one sample")
    if (class_ids.min() < 0 or class_ids.max() >= config.num_classes):
        raise ValueError(f"class ids must lie in [0, {config.num_classes})")
    num_classes, num_modes = config.num_classes, config.modes_per_class

    flat_samples = samples.detach().to("cpu", torch.float64).flatten(1)
    flat_means = mixture.means.to(torch.float64).flatten(2)  # (K, M, D)
    # Distances to every mode of every class, then keep the sample's own class: (N, M).
    all_distances = torch.cdist(flat_samples, flat_means.flatten(0, 1), compute_mode="donot_use_mm_for_euclid_dist")
    own_distances = all_distances.view(-1, num_classes, num_modes)[torch.arange(len(class_ids)), class_ids]
    nearest_distance, nearest_mode = own_distances.min(dim=1)
    precise = nearest_distance <= mixture.precision_radius

    bins = class_ids * num_modes + nearest_mode
    samples_per_class = torch.bincount(class_ids, minlength=num_classes)
    precise_per_class = torch.bincount(class_ids, weights=precise.double(), minlength=num_classes)
    assigned = torch.bincount(bins, minlength=num_classes * num_modes).view(num_classes, num_modes).double()
    assigned_precise = (
        torch.bincount(bins, weights=precise.double(), minlength=num_classes * num_modes).view(num_classes, num_modes)
    )

    counts = samples_per_class.double()
    weights = mixture.weights.to(torch.float64)
    present = samples_per_class > 0
    safe_counts = counts.clamp_min(1)[:, None]
    precision = precise_per_class / counts.clamp_min(1)
    hit_threshold = (RECALL_WEIGHT_SHARE * weights * counts[:, None]).clamp_min(1.0)
    recall = (assigned_precise >= hit_threshold).double().mean(dim=1)
    smoothed = assigned / safe_counts + HISTOGRAM_SMOOTHING
    empirical = smoothed / smoothed.sum(dim=1, keepdim=True)
    mode_kl = (weights * (weights / empirical).log()).sum(dim=1)

    def per_class(values: torch.Tensor) -> list[float | None]:
        return [float(value) if has_samples else None for value, has_samples in zip(values, present.tolist())]

    def average(values: torch.Tensor) -> float:
        return float(values[present].mean()) if present.any() else float("nan")

    return {
        "precision": average(precision),
        "recall": average(recall),
        "mode_kl": average(mode_kl),
        "precision_per_class": per_class(precision),
        "recall_per_class": per_class(recall),
        "mode_kl_per_class": per_class(mode_kl),
        "samples_per_class": samples_per_class.tolist(),
        "num_samples": len(class_ids),
    }


def sliced_wasserstein(samples: torch.Tensor, reference: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two sample sets (N, ...) and (M, ...), flattened.

    Both sets are projected on the same random unit directions; along each direction W2 between the two
    1-D empirical distributions is computed from matched quantiles (N and M may differ), and the result
    is the root mean square over directions.
    """
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64).flatten(1)
    y = torch.as_tensor(reference).detach().to("cpu", torch.float64).flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: samples have {x.shape[1]} values each, the reference {y.shape[1]}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError("sliced_wasserstein needs at least one sample in each set")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = torch.linspace(0, 1, max(len(x), len(y)), dtype=torch.float64)
    x_quantiles = torch.quantile(x @ directions, levels, dim=0)
    y_quantiles = torch.quantile(y @ directions, levels, dim=0)
    return float(((x_quantiles - y_quantiles) ** 2).mean().sqrt())
