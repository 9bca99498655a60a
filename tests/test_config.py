"""Model presets load on their own (no toy data to clash with) and are typed by the schema."""
import pytest

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
    checkpoint.write_bytes(b"")
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
    assert (cfg.distill.method, cfg.optim.lr, cfg.optim.lr_fake_score) == ("rcm", 2.0e-6, 4.0e-7)
    dims = resolve_parallel_dims(cfg.parallel, world_size)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp) == mesh
