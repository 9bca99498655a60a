"""Tests of the toy mixture: determinism, shapes, mode statistics, separation, save/load and the data set builder."""
import pytest
import torch

from rcm.data.shards import ShardLoader
from rcm.data.toy import (
    GROUND_TRUTH_FILE,
    NEGATIVE_EMBEDDING_FILE,
    ToyMixture,
    ToyMixtureConfig,
    build_toy_dataset,
)


def test_mixture_is_deterministic_and_shaped():
    """The same config gives identical ground truth; every tensor has the documented shape and dtype."""
    config = ToyMixtureConfig()
    first, second = ToyMixture(config), ToyMixture(config)
    assert torch.equal(first.means, second.means)
    assert torch.equal(first.weights, second.weights)
    assert all(torch.equal(a, b) for a, b in zip(first.embeddings, second.embeddings))
    assert torch.equal(first.negative_embedding, second.negative_embedding)
    assert not torch.equal(first.means, ToyMixture(ToyMixtureConfig(seed=1)).means)

    assert first.means.shape == (8, 3, 4, 2, 8, 8) and first.means.dtype == torch.float32
    assert first.weights.shape == (8, 3)
    torch.testing.assert_close(first.weights.sum(dim=1), torch.ones(8))
    assert first.weights.min() >= config.min_mode_weight - 1e-6
    assert len(first.embeddings) == len(first.prompts) == 8
    for embedding in first.embeddings:
        assert config.text_len // 2 <= embedding.shape[0] <= config.text_len and embedding.shape[1] == config.text_dim
    assert first.negative_embedding.shape == (config.text_len, config.text_dim)
    assert first.prompts[3] == "toy prompt 3"
    # A mode mean varies over (C, T) only.
    assert torch.equal(first.means, first.means[..., :1, :1].expand_as(first.means))


def test_samples_of_a_mode_sit_at_the_mode():
    """Samples' mode indices follow the weights, and per mode the empirical mean/std match the mode and mode_std."""
    mixture = ToyMixture()
    generator = torch.Generator().manual_seed(1)
    class_ids = torch.full((6000,), 2)
    latents, modes = mixture.sample_with_modes(class_ids, generator)
    assert latents.shape == (6000, 4, 2, 8, 8) and latents.dtype == torch.float32
    frequencies = torch.bincount(modes, minlength=3).float() / len(modes)
    torch.testing.assert_close(frequencies, mixture.weights[2], atol=0.03, rtol=0)
    for mode in range(3):
        selected = latents[modes == mode]
        torch.testing.assert_close(selected.mean(dim=0), mixture.means[2, mode], atol=0.05, rtol=0)
        residual_std = (selected - mixture.means[2, mode]).std()
        assert abs(residual_std - mixture.config.mode_std) < 0.01
    # Same generator seed, same samples.
    again = mixture.sample(class_ids[:10], torch.Generator().manual_seed(1))
    assert torch.equal(again, mixture.sample(class_ids[:10], torch.Generator().manual_seed(1)))


def test_same_class_modes_are_more_than_two_radii_apart():
    """For the default config any two modes of one class are > 2 precision radii apart (disjoint balls)."""
    mixture = ToyMixture()
    nearest = min(torch.pdist(mixture.means[k].flatten(1)).min().item() for k in range(mixture.config.num_classes))
    print(f"nearest same-class mode distance {nearest:.2f}, 2 × precision radius {2 * mixture.precision_radius:.2f}")
    assert nearest > 2 * mixture.precision_radius


def test_save_load_round_trip(tmp_path):
    """ToyMixture.load gives back exactly the saved ground truth and config."""
    mixture = ToyMixture(ToyMixtureConfig(num_classes=3, text_len=6, seed=5))
    mixture.save(tmp_path / "gt.pt")
    loaded = ToyMixture.load(tmp_path / "gt.pt")
    assert loaded.config == mixture.config
    assert torch.equal(loaded.means, mixture.means) and torch.equal(loaded.weights, mixture.weights)
    assert all(torch.equal(a, b) for a, b in zip(loaded.embeddings, mixture.embeddings))
    assert torch.equal(loaded.negative_embedding, mixture.negative_embedding)
    assert loaded.prompts == mixture.prompts
    assert loaded.precision_radius == mixture.precision_radius


def test_build_toy_dataset_writes_loadable_shards(tmp_path):
    """The builder writes shards the loader reads, the ground truth and the negative embedding; a rebuild replaces shards."""
    config = ToyMixtureConfig(num_classes=4)
    shards = build_toy_dataset(tmp_path, num_samples=50, samples_per_shard=20, mixture_config=config, seed=3)
    assert [path.name for path in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    mixture = ToyMixture.load(tmp_path / GROUND_TRUTH_FILE)
    assert torch.equal(torch.load(tmp_path / NEGATIVE_EMBEDDING_FILE), mixture.negative_embedding)

    loader = ShardLoader(tmp_path, batch_size=50, latent_shape=config.latent_shape, text_len=8, text_dim=32)
    batch = next(loader)
    for latent, prompt, length, embed in zip(batch["latent"], batch["prompt"], batch["embed_length"], batch["embed"]):
        class_id = int(prompt.rsplit(" ", 1)[1])
        assert torch.equal(embed[:length], mixture.embeddings[class_id])
        assert (latent - mixture.means[class_id]).flatten(1).norm(dim=1).min() < mixture.precision_radius

    build_toy_dataset(tmp_path, num_samples=10, samples_per_shard=20, mixture_config=config, seed=3)
    assert sorted(path.name for path in tmp_path.glob("*.tar")) == ["shard-000000.tar"]


@pytest.mark.parametrize("kind, expected", [
    ("text", ""), ("truncated", ""), ("list", "the dict that ToyMixture.save writes"),
    ("tensor", "the dict that ToyMixture.save writes"),
])
def test_a_bad_ground_truth_is_one_sentence_naming_the_file(tmp_path, kind, expected):
    """A text file, a truncated file, or a .pt holding a list or a tensor as ground_truth.pt: one sentence naming
    the file and what it should hold, not torch's own error."""
    from tests.test_torch_files import assert_one_sentence_about, write_bad_torch_file

    path = write_bad_torch_file(tmp_path / GROUND_TRUTH_FILE, kind)
    with pytest.raises(ValueError) as error:
        ToyMixture.load(path)
    assert str(error.value).startswith(f"toy ground truth {path} ")
    assert_one_sentence_about(error.value, path, kind, expected)


def test_a_dict_of_another_kind_is_no_ground_truth(tmp_path):
    """A state dict in place of ground_truth.pt is named as not written by ToyMixture.save."""
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=rf"^toy ground truth {tmp_path / 'weights.pt'} is not one written by "
                                         r"ToyMixture.save \(format_version None, expected 1\)$"):
        ToyMixture.load(tmp_path / "weights.pt")
