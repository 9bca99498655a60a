"""Model presets load on their own (no toy data to clash with) and are typed by the schema."""
import pytest
import torch

from rcm.config import config_from_json, load_model_preset, model_presets
from rcm.eval.networks import NetworkSource
from rcm.models.umt5 import UMT5Config


def test_every_preset_loads_with_its_official_sizes():
    assert {"tiny", "wan2.1-t2v-1.3B", "wan2.1-t2v-14B"} <= set(model_presets())
    small, large = load_model_preset("wan2.1-t2v-1.3B"), load_model_preset("wan2.1-t2v-14B")
    assert (small.dim, small.num_layers, small.in_channels) == (1536, 30, 16)
    assert (large.dim, large.num_layers, large.num_heads) == (5120, 40, 40)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="wan2.1-t2v-1.3B"):
        load_model_preset("wan2.1-t2v-13B")


def test_a_bare_checkpoint_with_a_wan_preset_opens(tmp_path):
    checkpoint = tmp_path / "student.pth"
    torch.save({}, checkpoint)  # a torch file: NetworkSource.open refuses what is no checkpoint at all
    assert NetworkSource.open(checkpoint, model="wan2.1-t2v-1.3B").model_cfg.text_dim == 4096


def test_config_from_json_rejects_unknown_fields():
    assert config_from_json(UMT5Config, {"dim": 8, "dim_attn": 8, "dim_ffn": 8, "num_heads": 2}, "--x").dim == 8
    with pytest.raises(ValueError, match="--t5_config must be a JSON object"):
        config_from_json(UMT5Config, {"width": 8}, "--t5_config")


@pytest.mark.parametrize("experiment,preset,world_size,mesh", [
    ("wan1.3b_rcm", "wan2.1-t2v-1.3B", 8, (1, 8, 1)),
    ("wan14b_rcm", "wan2.1-t2v-14B", 8, (1, 2, 4)),
    ("wan14b_rcm", "wan2.1-t2v-14B", 16, (1, 4, 4)),
])
def test_wan_experiments_compose_and_mesh(experiment, preset, world_size, mesh):
    """The Wan experiments compose with their required paths given, validate, and resolve to the intended mesh
    (dp_replicate, dp_shard, cp) on a node or two of 8 GPUs."""
    from rcm.config import load_config
    from rcm.parallel.mesh import resolve_parallel_dims

    cfg = load_config([f"experiment={experiment}", "distill.teacher_checkpoint=teacher.pth", "data.shards=d/",
                       "data.negative_embedding=n.pt"])
    assert dict(cfg.model) == {**dict(load_model_preset(preset)), "attention_backend": "triton"}
    d = cfg.distill
    if experiment == "wan1.3b_rcm":  # rcm_spec.md §4
        assert (cfg.optim.lr, cfg.optim.lr_fake_score, d.student_update_freq, d.tangent_warmup) == (2.0e-6, 4.0e-7, 5, 1000)
        assert (d.scm_time.p_mean, d.sample_sigma_max, cfg.data.latent_shape[1]) == (0.7, 80.0, 20)
        assert cfg.parallel.activation_checkpointing == "block"
    else:  # §4b
        assert (cfg.optim.lr, cfg.optim.lr_fake_score, d.student_update_freq, d.tangent_warmup) == (1.0e-6, 1.0e-7, 10, 0)
        assert (d.scm_time.p_mean, d.scm_time.p_std, d.sample_sigma_max, cfg.data.latent_shape[1]) == (1.5, 1.6, 200.0, 21)
        assert cfg.parallel.activation_checkpointing == "mm_only"
    assert (d.method, d.guidance_scale, d.dmd_time.kind, d.dmd_time.shift) == ("rcm", 5.0, "uniform_shift", 5.0)
    dims = resolve_parallel_dims(cfg.parallel, world_size)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp) == mesh


@pytest.mark.parametrize("override,key", [
    ("distill.dcm_skip_interval=0", "distill.dcm_skip_interval"),
    ("distill.dcm_skip_interval=48", "distill.dcm_skip_interval"),
    ("distill.guidance_scale=-0.5", "distill.guidance_scale"),
    ("parallel.activation_checkpointing=everything", "parallel.activation_checkpointing"),
    ("distill.max_simulation_steps=0", "distill.max_simulation_steps"),
])
def test_bad_recipe_values_name_their_key(override, key):
    """A dCM skipping interval outside [1, 48), a negative guidance or an unknown checkpointing policy fails with
    one sentence naming the key."""
    from rcm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        load_config(["experiment=toy_dcm", override])
    assert "\n" not in str(error.value)


def test_guidance_at_most_one_needs_no_negative_embedding():
    """w ≤ 1 skips the unconditional branch, so no negative prompt is needed; w > 1 needs it."""
    from rcm.config import ConfigError, load_config

    assert load_config(["experiment=toy_rcm", "distill.guidance_scale=0.5", "data.negative_embedding=null"])
    with pytest.raises(ConfigError, match="data.negative_embedding"):
        load_config(["experiment=toy_rcm", "distill.guidance_scale=1.5", "data.negative_embedding=null"])
