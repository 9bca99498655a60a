"""Quality metrics of generated latents.

Toy ground truth (the known modes of a ToyMixture): precision, mode recall, mode KL and the sliced
Wasserstein distance to true samples. Real latents, where no pretrained feature network is available:
`diversity` (spread of the samples of one prompt) and `teacher_student_agreement` (how close the student
lands to the teacher from the same noise).
"""
from __future__ import annotations

import math

import torch

from rcm.data.toy import ToyMixture

HISTOGRAM_SMOOTHING = 1e-3
RECALL_WEIGHT_SHARE = 0.1
# True samples drawn per class as the sliced-Wasserstein reference (at least as many as generated ones).
MIN_REFERENCE_SAMPLES_PER_CLASS = 1000
REFERENCE_SEED = 12345


def toy_metrics(
    samples: torch.Tensor, class_ids: torch.Tensor, mixture: ToyMixture, sliced_wasserstein_projections: int = 128
) -> dict:
    """Precision, recall, mode KL and sliced W2 of samples (N,C,T,H,W) generated for class ids (N,), per class and averaged.

    Distances are L2 over the whole latent; every sample is assigned to the nearest mode of its own class.
    For a class k with n_k samples and modes m with true weights w_m:
      precision_k = share of the n_k samples within `mixture.precision_radius` of some mode of class k;
      recall_k    = share of the modes of class k that are hit: mode m is hit when at least
                    max(1, 0.1·w_m·n_k) of the precise samples are assigned to it;
      mode_kl_k   = KL(w ‖ q) with q the histogram of the nearest mode over all n_k samples, as frequencies
                    smoothed by adding 1e-3 to each bin and renormalized (so a missed mode costs a finite amount);
      sliced_wasserstein_k = `sliced_wasserstein` between the n_k samples and max(n_k, 1000) true samples of
                    class k, drawn with a seed that depends only on the class (so a class scores the same
                    whether it is evaluated alone or with others); 0 projections skip it.
    Returned dict: "precision", "recall", "mode_kl", "sliced_wasserstein" (unweighted means over the classes
    that have samples), "precision_per_class", "recall_per_class", "mode_kl_per_class",
    "sliced_wasserstein_per_class" (lists, None for classes without samples), "samples_per_class"
    (list of int) and "num_samples".
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
    distance_to_truth = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    if sliced_wasserstein_projections > 0:
        for class_id in present.nonzero().flatten().tolist():
            own = flat_samples[class_ids == class_id]
            truth = _true_class_samples(mixture, class_id, max(len(own), MIN_REFERENCE_SAMPLES_PER_CLASS))
            distance_to_truth[class_id] = sliced_wasserstein(own, truth, sliced_wasserstein_projections)

    def per_class(values: torch.Tensor) -> list[float | None]:
        return [float(value) if has_samples else None for value, has_samples in zip(values, present.tolist())]

    def average(values: torch.Tensor) -> float:
        return float(values[present].mean()) if present.any() else float("nan")

    return {
        "precision": average(precision),
        "recall": average(recall),
        "mode_kl": average(mode_kl),
        "sliced_wasserstein": average(distance_to_truth),
        "precision_per_class": per_class(precision),
        "recall_per_class": per_class(recall),
        "mode_kl_per_class": per_class(mode_kl),
        "sliced_wasserstein_per_class": per_class(distance_to_truth),
        "samples_per_class": samples_per_class.tolist(),
        "num_samples": len(class_ids),
    }


def _true_class_samples(mixture: ToyMixture, class_id: int, count: int) -> torch.Tensor:
    """`count` true samples of one class, flattened (count, D) float64, from a seed fixed per class."""
    generator = torch.Generator().manual_seed(REFERENCE_SEED * 1_000_003 + class_id)
    class_ids = torch.full((count,), class_id, dtype=torch.int64)
    return mixture.sample(class_ids, generator).to(torch.float64).flatten(1)


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


def diversity(samples: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the samples (N, ...) of one prompt, divided by sqrt(elements per sample).

    The normalization makes it a per-element RMS difference: independent samples with per-element std σ
    score ≈ sqrt(2)·σ whatever the latent size; identical samples score 0 (mode collapse).
    """
    flat = torch.as_tensor(samples).detach().to("cpu", torch.float64).flatten(1)
    if len(flat) < 2:
        raise ValueError(f"diversity needs at least two samples of the prompt, got {len(flat)}")
    return float(torch.pdist(flat).mean() / math.sqrt(flat.shape[1]))


def teacher_student_agreement(
    student: torch.Tensor, teacher: torch.Tensor, data_range: float | None = None
) -> dict[str, float]:
    """How closely student samples match teacher samples drawn from the same noise, in latent space.

    student, teacher: (N, ...) paired row by row. Returns
      "mse":    mean squared difference over all elements;
      "cosine": mean over pairs of the cosine similarity of the flattened latents (1 = same direction);
      "psnr":   10·log10(data_range² / mse) in dB, with data_range the teacher samples' max − min unless
                given (latents have no fixed range); infinite when the samples are identical.
    """
    student_flat = torch.as_tensor(student).detach().to("cpu", torch.float64).flatten(1)
    teacher_flat = torch.as_tensor(teacher).detach().to("cpu", torch.float64).flatten(1)
    if student_flat.shape != teacher_flat.shape or len(student_flat) == 0:
        raise ValueError(
            f"teacher_student_agreement needs paired, non-empty sample sets of one shape; got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    mse = float(((student_flat - teacher_flat) ** 2).mean())
    cosine = float(torch.nn.functional.cosine_similarity(student_flat, teacher_flat, dim=1).mean())
    if data_range is None:
        data_range = float(teacher_flat.max() - teacher_flat.min())
    if mse == 0:
        psnr = math.inf
    elif data_range <= 0:  # a constant teacher set: no signal to compare the error with
        psnr = -math.inf
    else:
        psnr = 10 * math.log10(data_range**2 / mse)
    return {"mse": mse, "cosine": cosine, "psnr": psnr}
