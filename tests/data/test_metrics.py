"""Tests of the ground-truth toy metrics on constructed sample sets whose answer is known."""
import math
import time

import pytest
import torch

from rcm.data.metrics import toy_metrics
from rcm.data.toy import ToyMixture, ToyMixtureConfig


@pytest.fixture(scope="module")
def mixture():
    return ToyMixture(ToyMixtureConfig())


def _samples_at_modes(mixture, counts):
    """Latents placed exactly at mode means: counts[k][m] copies of mode m of class k."""
    latents, class_ids = [], []
    for class_id, per_mode in enumerate(counts):
        for mode, count in enumerate(per_mode):
            latents.append(mixture.means[class_id, mode].expand(count, *mixture.config.latent_shape))
            class_ids += [class_id] * count
    return torch.cat(latents), torch.tensor(class_ids)


def test_samples_at_modes_in_true_proportions_are_perfect(mixture):
    """Samples exactly at the modes with the true weights: precision 1, recall 1, mode KL ≈ 0."""
    counts = (mixture.weights * 1000).round().long().tolist()
    samples, class_ids = _samples_at_modes(mixture, counts)
    metrics = toy_metrics(samples, class_ids, mixture)
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert 0 <= metrics["mode_kl"] < 1e-3
    assert metrics["precision_per_class"] == [1.0] * 8 and metrics["num_samples"] == len(class_ids)


def test_collapse_onto_one_mode_has_recall_one_over_modes(mixture):
    """All samples of every class in its first mode: precision 1, recall 1/modes_per_class, large KL."""
    samples, class_ids = _samples_at_modes(mixture, [[200, 0, 0]] * 8)
    metrics = toy_metrics(samples, class_ids, mixture)
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["mode_kl"] > 1.0


def test_a_mode_below_the_hit_threshold_is_not_recalled(mixture):
    """A mode gets fewer than 0.1·weight·n precise samples: it does not count as hit."""
    weight = mixture.weights[0, 1].item()
    below = int(0.1 * weight * 1000) - 5
    samples, class_ids = _samples_at_modes(mixture, [[1000 - below - 400, below, 400]])
    metrics = toy_metrics(samples, class_ids, mixture)
    assert metrics["recall_per_class"][0] == pytest.approx(2 / 3)
    assert metrics["recall_per_class"][1:] == [None] * 7
    assert metrics["samples_per_class"] == [1000] + [0] * 7


def test_far_samples_have_zero_precision(mixture):
    """Samples far from every mode: precision 0 and recall 0."""
    class_ids = torch.arange(8).repeat(50)
    samples = mixture.means[class_ids, 0] + 100.0
    metrics = toy_metrics(samples, class_ids, mixture)
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0


def test_true_mixture_samples_score_well_and_fast(mixture):
    """10k samples of the true mixture: precision > 0.99, recall 1, small KL, computed in well under a second."""
    generator = torch.Generator().manual_seed(0)
    class_ids = torch.randint(8, (10_000,), generator=generator)
    samples = mixture.sample(class_ids, generator)
    started = time.perf_counter()
    metrics = toy_metrics(samples, class_ids, mixture)
    elapsed = time.perf_counter() - started
    assert metrics["precision"] > 0.99 and metrics["recall"] == 1.0 and metrics["mode_kl"] < 0.01
    assert elapsed < 2.0


def test_wrong_sample_shape_is_rejected(mixture):
    """Samples whose latent shape differs from the mixture's fail with a ValueError naming the shapes."""
    with pytest.raises(ValueError, match="shape"):
        toy_metrics(torch.zeros(4, 4, 2, 8, 9), torch.zeros(4, dtype=torch.long), mixture)


def test_sliced_wasserstein_of_shifted_gaussians():
    """W2 between N(0, I) and N(μ, I) is ‖μ‖; projected on a unit direction u it is |u·μ|, and the mean of
    (u·μ)² over random unit directions in D dimensions is ‖μ‖²/D."""
    import math

    from rcm.data.metrics import sliced_wasserstein

    g = torch.Generator().manual_seed(0)
    dim = 8
    x = torch.randn(20000, dim, generator=g, dtype=torch.float64)
    shift = torch.full((dim,), 0.5, dtype=torch.float64)
    y = torch.randn(20000, dim, generator=g, dtype=torch.float64) + shift
    expected = shift.norm().item() / math.sqrt(dim)
    assert abs(sliced_wasserstein(x, y, num_projections=512) - expected) < 0.05 * expected + 0.02
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x[:5000], x[5000:15000]) < 0.05  # same distribution, different sizes


# Samples exactly at the modes → precision 1 and all samples in one mode → recall 1/k are checked above
# (test_samples_at_modes_in_true_proportions_are_perfect, test_collapse_onto_one_mode_has_recall_one_over_modes).


def test_toy_metrics_sliced_wasserstein_to_true_samples(mixture):
    """True samples lie close to the truth in sliced W2 (100 per class: finite-sample noise only); shifting every
    element by 1 moves them by ≈ 1 (a constant shift δ·1 projected on random unit directions has RMS |δ|, up to
    the spread of 128 directions); a class scores the same alone as among the others."""
    generator = torch.Generator().manual_seed(1)
    class_ids = torch.arange(8).repeat(100)
    samples = mixture.sample(class_ids, generator)
    true = toy_metrics(samples, class_ids, mixture)
    shifted = toy_metrics(samples + 1.0, class_ids, mixture)
    assert true["sliced_wasserstein"] < 0.25
    assert shifted["sliced_wasserstein"] == pytest.approx(1.0, abs=0.25)
    assert shifted["sliced_wasserstein"] > 4 * true["sliced_wasserstein"]
    alone = toy_metrics(samples[class_ids == 3], class_ids[class_ids == 3], mixture)
    assert alone["sliced_wasserstein_per_class"][3] == true["sliced_wasserstein_per_class"][3]
    assert toy_metrics(samples, class_ids, mixture, sliced_wasserstein_projections=0)["precision"] == true["precision"]


def test_identical_samples_have_zero_diversity():
    """Mode collapse: every sample of the prompt the same → diversity 0."""
    from rcm.data.metrics import diversity

    assert diversity(torch.ones(5, 2, 3, 4, 4)) == 0.0


def test_diversity_is_the_per_element_mean_pairwise_distance():
    """Constant latents 0, a, 2a: pairwise per-element RMS distances a, 2a, a → diversity 4a/3, whatever the size;
    independent N(0, σ²) samples score ≈ sqrt(2)·σ."""
    from rcm.data.metrics import diversity

    a = 0.3
    samples = torch.stack([torch.full((4, 2, 8, 8), value) for value in (0.0, a, 2 * a)])
    assert diversity(samples) == pytest.approx(4 * a / 3)
    gaussian = 0.5 * torch.randn(20, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    assert diversity(gaussian) == pytest.approx(math.sqrt(2) * 0.5, rel=0.05)
    with pytest.raises(ValueError, match="at least two"):
        diversity(samples[:1])


def test_identical_teacher_and_student_agree_perfectly():
    """Same samples: MSE 0, cosine 1, PSNR infinite."""
    from rcm.data.metrics import teacher_student_agreement

    teacher = torch.randn(6, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    agreement = teacher_student_agreement(teacher.clone(), teacher)
    assert agreement["mse"] == 0.0 and agreement["cosine"] == pytest.approx(1.0) and agreement["psnr"] == math.inf


def test_teacher_student_agreement_known_values():
    """Student = teacher + 0.1: MSE 0.01 and PSNR 10·log10(range²/0.01); student = −teacher: cosine −1;
    student = 3·teacher: cosine 1 with MSE 4·mean(teacher²)."""
    from rcm.data.metrics import teacher_student_agreement

    teacher = torch.linspace(-1.0, 1.0, 2 * 128, dtype=torch.float64).reshape(2, 2, 2, 4, 8)
    shifted = teacher_student_agreement(teacher + 0.1, teacher)
    assert shifted["mse"] == pytest.approx(0.01)
    assert shifted["psnr"] == pytest.approx(10 * math.log10(2.0**2 / 0.01))
    assert teacher_student_agreement(-teacher, teacher)["cosine"] == pytest.approx(-1.0)
    scaled = teacher_student_agreement(3 * teacher, teacher)
    assert scaled["cosine"] == pytest.approx(1.0) and scaled["mse"] == pytest.approx(4 * float(teacher.square().mean()))
    with pytest.raises(ValueError, match="paired"):
        teacher_student_agreement(teacher[:1], teacher)
