"""Network weights from the published layouts: the official Wan2.1 DiT's safetensors (one file, or shards with an
index as for 14B), the rCM release's Linear patch embedding, and strict errors."""
from __future__ import annotations

import json

import pytest
import torch

from rcm.checkpoint.weights import SafetensorsState, load_model_weights
from tests.helpers import tiny_dit

safetensors_torch = pytest.importorskip("safetensors.torch")


def assert_same_weights(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value.reshape(loaded[name].shape).to(loaded[name].dtype)), name


@pytest.fixture
def source_state():
    return {k: v.float().contiguous() for k, v in tiny_dit(4).state_dict().items()}


def test_one_safetensors_file_loads(source_state, tmp_path):
    safetensors_torch.save_file(source_state, tmp_path / "diffusion_pytorch_model.safetensors")
    target = tiny_dit(5)
    assert load_model_weights(target, tmp_path / "diffusion_pytorch_model.safetensors") == "safetensors"
    assert_same_weights(target, source_state)


def test_sharded_safetensors_directory_with_an_index_loads(source_state, tmp_path):
    """As the 14B is published: N shards named by diffusion_pytorch_model.safetensors.index.json. A stray
    safetensors file the index does not name is ignored."""
    names = sorted(source_state)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        safetensors_torch.save_file({k: source_state[k] for k in keys}, tmp_path / file)
    safetensors_torch.save_file({"junk": torch.zeros(1)}, tmp_path / "other.safetensors")
    weight_map = {key: file for file, keys in halves.items() for key in keys}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state = SafetensorsState(tmp_path)
    assert len(state) == len(names) and state.shape_of(names[0]) == tuple(source_state[names[0]].shape)
    target = tiny_dit(5)
    assert load_model_weights(target, tmp_path) == "safetensors"
    assert_same_weights(target, source_state)


def test_safetensors_in_bf16_and_the_release_patch_embedding(source_state, tmp_path):
    """bf16 files load into a float32 model (cast per tensor); a Linear patch embedding is reshaped."""
    state = {k: v.to(torch.bfloat16) for k, v in source_state.items()}
    state["patch_embedding.weight"] = state["patch_embedding.weight"].flatten(1).contiguous()
    safetensors_torch.save_file(state, tmp_path / "student.safetensors")
    target = tiny_dit(5).float()
    load_model_weights(target, tmp_path / "student.safetensors")
    assert_same_weights(target, {k: v.to(torch.bfloat16) for k, v in source_state.items()})


def test_a_wrong_safetensors_file_names_the_differences(source_state, tmp_path):
    state = dict(source_state)
    del state["head.head.weight"]
    state["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    safetensors_torch.save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 keys .*head\.head\.weight.*wrong shapes: blocks\.0\.ffn\.0\.weight \(3, 3\)"):
        load_model_weights(tiny_dit(5), tmp_path / "bad.safetensors")


def test_dcp_of_a_release_checkpoint_loads_into_the_conv_layout(source_state, tmp_path):
    """A DCP conversion of an rCM release .pth keeps its Linear patch embedding: it is read into a view of the
    Conv3d weight."""
    import torch.distributed.checkpoint as dcp

    release = dict(source_state)
    release["patch_embedding.weight"] = release["patch_embedding.weight"].flatten(1).clone()
    dcp.save(release, checkpoint_id=str(tmp_path / "release.dcp"), no_dist=True)
    target = tiny_dit(5)
    assert load_model_weights(target, tmp_path / "release.dcp") == "dcp"
    assert_same_weights(target, source_state)


def test_a_directory_without_weights_names_what_is_accepted(tmp_path):
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds no weights: no DCP \.metadata, no \*\.safetensors.*run directory"):
        load_model_weights(tiny_dit(5), tmp_path)
