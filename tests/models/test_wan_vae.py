"""Tests for rcm.models.wan_vae: the official Wan2.1_VAE.pth layout and size, chunked == whole-video
encoding and decoding, causality, shapes, latent normalization and checkpoint loading."""
import pytest
import torch

from rcm.models.wan_vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    WanVAE,
    WanVAEConfig,
    load_wan_vae,
)
from tests.helpers import tiny_dit

F64 = torch.float64
# The real temporal (4×) and spatial (8×) compression with narrow channels.
TINY = WanVAEConfig(dim=4, num_res_blocks=1)

# Names and shapes of the released Wan2.1_VAE.pth, worked out from the official `WanVAE_` in Wan2.1's
# wan/modules/vae.py (dim 96, z_dim 16, dim_mult 1,2,4,4, 2 residual blocks, temporal downsampling in the
# last two stages). Decoder stages have 3 residual blocks; upsampling halves the channels.
OFFICIAL_KEY_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.conv1.bias": (96,),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.0.residual.2.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.0.residual.3.gamma": (96, 1, 1, 1),
    "encoder.downsamples.0.residual.6.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.resample.1.weight": (192, 192, 3, 3),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.6.shortcut.weight": (384, 192, 1, 1, 1),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.downsamples.10.residual.6.bias": (384,),
    "encoder.middle.0.residual.2.weight": (384, 384, 3, 3, 3),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.middle.2.residual.6.weight": (384, 384, 3, 3, 3),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv1.bias": (32,),
    "conv2.weight": (16, 16, 1, 1, 1),
    "conv2.bias": (16,),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.middle.1.to_qkv.bias": (1152,),
    "decoder.upsamples.0.residual.2.weight": (384, 384, 3, 3, 3),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.8.residual.2.weight": (192, 192, 3, 3, 3),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
    "decoder.head.2.bias": (3,),
}
# Stages without temporal resampling have no time_conv, and the release's decoder has no 16th block.
NOT_IN_OFFICIAL = ("encoder.downsamples.2.time_conv.weight", "decoder.upsamples.11.time_conv.weight",
                   "decoder.upsamples.15.residual.0.gamma", "decoder.upsamples.8.shortcut.weight")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_tiny_vae(seed: int = 0, dtype=F64) -> WanVAE:
    """A tiny VAE with every weight perturbed (norm gains included), so every path matters."""
    torch.manual_seed(seed)
    model = WanVAE(TINY).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    return random_tiny_vae()


def video(batch=1, frames=9, height=32, width=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, dtype=F64, generator=generator) * 2 - 1


def test_release_size_has_the_official_parameter_count():
    """The default config is the released VAE: 126,892,531 parameters, as in Wan2.1_VAE.pth."""
    with torch.device("meta"):
        model = WanVAE()
    assert model.num_parameters() == 126_892_531


def test_release_state_dict_has_official_key_names_and_shapes():
    """Keys and shapes follow the official `WanVAE_` layout (194 tensors, no norm biases, no buffers)."""
    with torch.device("meta"):
        state = WanVAE().state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    assert {name: shapes.get(name) for name in OFFICIAL_KEY_SHAPES} == OFFICIAL_KEY_SHAPES
    assert not [name for name in NOT_IN_OFFICIAL if name in shapes]
    assert len(shapes) == 194
    assert not [name for name in shapes if ".norm.bias" in name or name.endswith(("0.bias", "3.bias")) and "residual" in name]


def test_latent_statistics_are_wans_sixteen_channel_constants():
    """The normalization uses Wan2.1's 16 per-channel latent means and stds."""
    assert len(WAN21_LATENT_MEAN) == len(WAN21_LATENT_STD) == 16
    assert (WAN21_LATENT_MEAN[0], WAN21_LATENT_MEAN[-1]) == (-0.7571, -0.2921)
    assert (WAN21_LATENT_STD[0], WAN21_LATENT_STD[-1]) == (2.8184, 1.9160)
    assert WanVAEConfig().latent_mean == WAN21_LATENT_MEAN and WanVAEConfig().latent_std == WAN21_LATENT_STD


def test_latent_shape_formula_of_the_release():
    """81 frames at 480×832 → 21 latent frames at 60×104 (4× time after the first frame, 8× space)."""
    config = WanVAEConfig()
    assert (config.temporal_compression, config.spatial_compression) == (4, 8)
    assert config.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert config.latent_shape(1, 720, 1280) == (16, 1, 90, 160)


def test_encode_and_decode_shapes(tiny_vae):
    """9 frames 32×32 → 3 latent frames 4×4 → 9 frames 32×32, with the real compression factors."""
    with torch.no_grad():
        latent = tiny_vae.encode(video(batch=2, frames=9, height=32, width=32))
        assert latent.shape == (2, 16, 3, 4, 4)
        assert tiny_vae.decode(latent).shape == (2, 3, 9, 32, 32)


def test_81_frames_give_21_latent_frames_and_back(tiny_vae):
    """The chunked paths handle Wan's 81-frame clips: 21 latent frames, decoded back to 81 frames."""
    with torch.no_grad():
        latent = tiny_vae.encode(video(frames=81, height=16, width=16))
        assert latent.shape == (1, 16, 21, 2, 2)
        assert tiny_vae.decode(latent).shape == (1, 3, 81, 16, 16)


def test_chunked_encode_matches_whole_video_encode(tiny_vae):
    """First frame + chunks of 4 through the causal cache == all frames at once (float64, rel < 1e-10)."""
    clip = video(batch=2, frames=13, height=16, width=24)
    with torch.no_grad():
        chunked, whole = tiny_vae.encode(clip), tiny_vae.encode(clip, chunked=False)
    assert chunked.shape == (2, 16, 4, 2, 3)
    assert relative_error(chunked, whole) < 1e-10


def test_chunked_decode_matches_whole_video_decode(tiny_vae):
    """One latent frame at a time through the causal cache == all latent frames at once (rel < 1e-10)."""
    latent = torch.randn(2, 16, 4, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chunked, whole = tiny_vae.decode(latent), tiny_vae.decode(latent, chunked=False)
    assert chunked.shape == (2, 3, 13, 16, 24)
    assert relative_error(chunked, whole) < 1e-10
    assert chunked.abs().max() <= 1.0 and (chunked.abs() == 1.0).any(), "decode clamps to [-1, 1]"


@pytest.mark.parametrize("chunk_frames", [2, 3])
def test_decoding_several_latent_frames_per_chunk_matches_whole_video(tiny_vae, chunk_frames):
    """Chunks of 2 or 3 latent frames (the first one holding the image frame) == all frames at once."""
    latent = torch.randn(1, 16, 5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        chunked = tiny_vae.decode(latent, chunk_frames=chunk_frames)
        whole = tiny_vae.decode(latent, chunked=False)
    assert relative_error(chunked, whole) < 1e-10
    with pytest.raises(ValueError, match="chunk_frames"):
        tiny_vae.decode(latent, chunk_frames=0)


def test_encoding_and_decoding_are_causal(tiny_vae):
    """Changing frames 5-8 leaves latent frames 0-1 unchanged; changing latent frame 2 leaves frames 0-4."""
    clip = video(frames=9, height=16, width=16)
    changed = clip.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]
    with torch.no_grad():
        latent, latent_changed = tiny_vae.encode(clip), tiny_vae.encode(changed)
        assert torch.equal(latent[:, :, :2], latent_changed[:, :, :2])
        assert not torch.allclose(latent[:, :, 2], latent_changed[:, :, 2])
        latent_changed = latent.clone()
        latent_changed[:, :, 2] += 1.0
        frames, frames_changed = tiny_vae.decode(latent), tiny_vae.decode(latent_changed)
    assert torch.equal(frames[:, :, :5], frames_changed[:, :, :5])
    assert not torch.allclose(frames[:, :, 5:], frames_changed[:, :, 5:])


def test_encode_returns_the_wan_normalized_posterior_mean(tiny_vae):
    """encode = (mu - mean) / std with mu the first half of conv1(encoder(video)); decode undoes it first."""
    clip = video(frames=5, height=16, width=16)
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=F64).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD, dtype=F64).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        mu = tiny_vae.conv1(tiny_vae.encoder(clip)).chunk(2, dim=1)[0]
        latent = tiny_vae.encode(clip)
        assert relative_error(latent, (mu - mean) / std) < 1e-12
        raw_video = tiny_vae.decoder(tiny_vae.conv2(mu), None)
        assert relative_error(tiny_vae.decode(latent, chunked=False), raw_video.clamp(-1, 1)) < 1e-12


def test_bfloat16_model_runs(tiny_vae):
    """A bfloat16 VAE encodes and decodes (nearest upsampling needs no float32 detour) close to float64."""
    model = random_tiny_vae().to(torch.bfloat16)
    clip = video(frames=5, height=16, width=16)
    with torch.no_grad():
        latent = model.encode(clip)
        assert latent.dtype == torch.bfloat16
        assert relative_error(latent.double(), tiny_vae.encode(clip)) < 0.05
        assert torch.isfinite(model.decode(latent).float()).all()


def test_encode_rejects_frame_counts_and_sizes_it_cannot_chunk(tiny_vae):
    """T must be 1 + 4k and H, W multiples of 8; the error says so."""
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        tiny_vae.encode(video(frames=8, height=16, width=16))
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_vae.encode(video(frames=5, height=12, width=16))
    with pytest.raises(ValueError, match=r"\(B, 16, T, H, W\)"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 2, 2, dtype=F64))


def test_config_validation_names_the_field():
    """A temporal_downsample of the wrong length or a mean of the wrong size fails with the field's name."""
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="latent_mean"):
        WanVAEConfig(z_dim=4)
    assert WanVAEConfig(dim_mult=[1, 2, 4, 4], temporal_downsample=[False, True, True]).dim_mult == (1, 2, 4, 4)


# ----------------------------------------------------------------------------------------------------
# loading


def test_load_round_trips_bit_exactly_frozen_and_in_eval_mode(tiny_vae, tmp_path):
    """A saved VAE loads back with every tensor bit-identical, in the requested dtype, frozen, in eval mode."""
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(tiny_vae.state_dict(), path)
    loaded = load_wan_vae(path, device="cpu", dtype=F64, config=TINY)
    original = tiny_vae.state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in loaded.state_dict().items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert load_wan_vae(path, dtype=torch.bfloat16, config=TINY).conv1.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("wrap", [
    lambda state: {"state_dict": {"vae." + name: tensor for name, tensor in state.items()}},
    lambda state: {"model." + name: tensor for name, tensor in state.items()},
])
def test_load_accepts_the_usual_wrappers(tiny_vae, tmp_path, wrap):
    """A nested 'state_dict' and 'vae.' / 'model.' key prefixes are undone before the strict load."""
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(tiny_vae.state_dict()), path)
    loaded = load_wan_vae(path, dtype=F64, config=TINY)
    assert torch.equal(loaded.decoder.head[2].weight, tiny_vae.decoder.head[2].weight)


def test_loading_a_dit_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    """A DiT state dict in place of the VAE: the error names the file and lists missing and unexpected keys."""
    path = tmp_path / "dit.pth"
    torch.save(tiny_dit().state_dict(), path)
    with pytest.raises(ValueError) as error:
        load_wan_vae(path, config=TINY)
    message = str(error.value)
    assert str(path) in message and "Wan2.1_VAE.pth" in message
    vae_keys, dit_keys = WanVAE(TINY).state_dict(), tiny_dit().state_dict()
    assert f"missing {len(vae_keys)} keys" in message and "'conv1.weight'" in message
    assert f"unexpected {len(dit_keys)} keys" in message and "'blocks.0.cross_attn.k.bias'" in message


def test_loading_a_vae_without_a_key_names_that_key(tiny_vae, tmp_path):
    """A VAE checkpoint lacking one tensor fails strictly and names the missing key."""
    state = dict(tiny_vae.state_dict())
    del state["decoder.head.2.bias"]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing 1 keys.*decoder\.head\.2\.bias"):
        load_wan_vae(path, config=TINY)


def test_missing_checkpoint_file_says_which_file_is_expected(tmp_path):
    """A wrong path raises FileNotFoundError naming the path and Wan2.1_VAE.pth."""
    path = tmp_path / "nowhere" / "vae.pth"
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth") as error:
        load_wan_vae(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("kind", ["text", "truncated", "list", "tensor"])
def test_a_vae_file_that_is_no_state_dict_is_one_sentence(tmp_path, kind):
    """A text file, a truncated file, or a .pth holding a list or a tensor as the VAE: one sentence naming the
    file and the official file expected, not torch's own error."""
    from tests.test_torch_files import assert_one_sentence_about, write_bad_torch_file

    path = write_bad_torch_file(tmp_path / "vae.pth", kind)
    with pytest.raises(ValueError) as error:
        load_wan_vae(path, config=TINY)
    assert str(error.value).startswith(f"Wan VAE weights {path} ")
    assert_one_sentence_about(error.value, path, kind, *(["Wan2.1_VAE.pth"] if kind in ("list", "tensor") else []))
