"""The plug-in metric registry (--metric NAME=PATH) and the built-in latent_stats Fréchet distance."""
import math

import pytest
import torch

from rcm.data.toy import ToyMixture
from rcm.eval.metrics_plugins import (
    LatentStatistics,
    MetricWeightsError,
    SampleMetric,
    frechet_distance,
    parse_metric_spec,
    register_metric,
    registered_metrics,
    save_latent_statistics,
)


@register_metric("test_sample_count")
class SampleCount:
    """A plug-in that reads a number from its 'weights' file and counts samples and prompts."""

    def __init__(self, weights_path):
        self.scale = float(weights_path.read_text())
        self.samples, self.prompts = 0, set()

    def update(self, samples, prompts):
        self.samples += len(samples)
        self.prompts.update(prompts)

    def compute(self):
        return {"scaled_count": self.scale * self.samples, "distinct_prompts": float(len(self.prompts))}


def test_registered_plugin_is_built_from_its_spec(tmp_path):
    """NAME=PATH builds the registered class with the path; update/compute follow the protocol."""
    (tmp_path / "w.txt").write_text("0.5")
    spec = parse_metric_spec(f"test_sample_count={tmp_path / 'w.txt'}")
    metric = spec.build()
    assert isinstance(metric, SampleMetric) and "test_sample_count" in registered_metrics()
    metric.update(torch.zeros(4, 1, 1, 1, 1), ["a"] * 4)
    metric.update(torch.zeros(2, 1, 1, 1, 1), ["b"] * 2)
    assert metric.compute() == {"scaled_count": 3.0, "distinct_prompts": 2.0}


def test_missing_weights_name_the_metric_and_the_path(tmp_path):
    """A weights path that does not exist fails with the metric's name and the path; nothing is downloaded."""
    missing = tmp_path / "i3d.pt"
    with pytest.raises(MetricWeightsError, match=rf"metric 'latent_stats': weights {missing} do not exist"):
        parse_metric_spec(f"latent_stats={missing}")


def test_malformed_and_unknown_specs_list_the_registered_metrics():
    """No '=' or an unregistered name: the error shows the expected form and the registered names."""
    with pytest.raises(ValueError, match="NAME=/local/path.*latent_stats"):
        parse_metric_spec("latent_stats")
    with pytest.raises(ValueError, match="no metric named 'fvd'.*latent_stats"):
        parse_metric_spec("fvd=/weights/i3d.pt")


def test_frechet_distance_of_known_gaussians():
    """W2² of N(μa, a²I) and N(μb, b²I) in D dimensions is ‖μa − μb‖² + D(a − b)²; identical fits give 0."""
    dim = 6
    mean_a, mean_b = torch.zeros(dim), torch.full((dim,), 0.5)
    cov_a, cov_b = 4 * torch.eye(dim), torch.eye(dim)
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(dim * 0.25 + dim * (2 - 1) ** 2)
    random = torch.randn(50, dim, dtype=torch.float64)
    cov = random.T @ random / 49
    assert frechet_distance(mean_b, cov, mean_b, cov) == pytest.approx(0, abs=1e-9)


def test_latent_stats_separates_true_and_shifted_samples(tmp_path):
    """Reference statistics from true toy samples: fresh true samples score near 0, shifted ones ≈ C·T·shift²."""
    mixture = ToyMixture()
    generator = torch.Generator().manual_seed(0)
    class_ids = torch.arange(8).repeat(200)
    save_latent_statistics(mixture.sample(class_ids, generator), tmp_path / "stats.pt")
    fresh = mixture.sample(class_ids, generator)
    scores = {}
    for name, samples in (("true", fresh), ("shifted", fresh + 1.0)):
        metric = LatentStatistics(tmp_path / "stats.pt")
        metric.update(samples[:800], ["p"] * 800)
        metric.update(samples[800:], ["p"] * 800)
        scores[name] = metric.compute()["latent_frechet"]
    features = math.prod(mixture.config.latent_shape[:2])
    assert scores["true"] < 0.1 * features
    assert scores["shifted"] == pytest.approx(features + scores["true"], rel=0.15)


def test_latent_stats_rejects_a_file_of_another_kind(tmp_path):
    """A weights file that is not a statistics file is refused with the way to write one."""
    torch.save({"mean": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_latent_statistics"):
        LatentStatistics(tmp_path / "other.pt")


@pytest.mark.parametrize("content", ["text", "list"])
def test_latent_stats_names_a_text_or_list_file(tmp_path, content):
    """A text file or a list as the reference statistics ends in one sentence naming the metric and the file."""
    path = tmp_path / "stats.pt"
    if content == "text":
        path.write_text("mean 0\n")
    else:
        torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match=r"metric 'latent_stats': .*stats\.pt") as error:
        LatentStatistics(path)
    assert ("not a torch checkpoint" if content == "text" else "holds a list of 1 item") in str(error.value)
