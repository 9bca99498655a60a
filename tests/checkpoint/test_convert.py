""".pth ↔ DCP conversion: bit-exact round trips, byte-equal to torch's format_utils, selection / dtype / prefix
options, damaged sources, bounded memory; and teacher weights from either format."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from rcm.checkpoint.convert import dcp_to_pth, pth_to_dcp
from rcm.checkpoint.manager import CheckpointManager
from rcm.checkpoint.verify import CheckpointCorruptError, verify_dcp, verify_torch_file
from rcm.checkpoint.weights import load_model_weights
from tests.checkpoint.damage import flip_tensor_byte
from tests.helpers import tiny_dit

REPO = Path(__file__).resolve().parents[2]


def model_state(dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A Wan-layout state dict with mixed dtypes and shapes (incl. a 0-d and an integer tensor)."""
    state = {k: v.to(dtype) for k, v in tiny_dit(seed=3, dtype=torch.float32).state_dict().items()}
    state["scalar"] = torch.tensor(2.5, dtype=dtype)
    state["counts"] = torch.arange(7, dtype=torch.int64)
    return state


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_pth_dcp_pth_round_trip_is_bit_exact_and_byte_equal_to_format_utils(tmp_path):
    """.pth → .dcp → .pth gives the same tensors, and each file has the bytes format_utils writes for it."""
    state = model_state()
    torch.save(state, tmp_path / "model.pth")
    pth_to_dcp(tmp_path / "model.pth", tmp_path / "ours.dcp")
    torch_save_to_dcp(tmp_path / "model.pth", tmp_path / "reference.dcp")
    assert (tmp_path / "ours.dcp/__0_0.distcp").read_bytes() == (tmp_path / "reference.dcp/__0_0.distcp").read_bytes()
    (tmp_path / "ours").mkdir(), (tmp_path / "reference").mkdir()
    dcp_to_pth(tmp_path / "ours.dcp", tmp_path / "ours/back.pth")
    dcp_to_torch_save(tmp_path / "reference.dcp", tmp_path / "reference/back.pth")
    assert (tmp_path / "ours/back.pth").read_bytes() == (tmp_path / "reference/back.pth").read_bytes()
    assert_same_tensors(torch.load(tmp_path / "ours/back.pth", weights_only=True), state)
    assert verify_torch_file(tmp_path / "ours/back.pth") == [] and verify_dcp(tmp_path / "ours.dcp") == []


def test_training_checkpoint_to_ema_pth_with_dtype_and_prefix(tmp_path):
    """From a training checkpoint: pick the EMA, cast to bf16, add a prefix; nested 'all' equals format_utils."""
    student = {k: v.float() for k, v in model_state(torch.float32).items()}
    ema = {k: v + 1 for k, v in student.items()}
    manager = CheckpointManager(tmp_path / "checkpoints")
    path = manager.save(3, {"student": student, "ema": ema, "optim_student": {"param_groups": [{"lr": 0.1}]}}, {"iteration": 3}, wait=True)
    dcp_to_pth(path, tmp_path / "ema.pth", weights="ema", dtype=torch.bfloat16, add_prefix="model.")
    converted = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert_same_tensors(converted, {f"model.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ema.items()})
    dcp_to_pth(path, tmp_path / "all.pth")
    everything = torch.load(tmp_path / "all.pth", weights_only=True)
    (tmp_path / "ref").mkdir()
    dcp_to_torch_save(path, tmp_path / "ref/all.pth")
    reference = torch.load(tmp_path / "ref/all.pth", weights_only=True)
    assert everything.keys() == reference.keys() == {"student", "ema", "optim_student"}
    assert_same_tensors(everything["student"], reference["student"])
    assert everything["optim_student"] == reference["optim_student"]
    with pytest.raises(KeyError, match="no 'fake_score' weights"):
        dcp_to_pth(path, tmp_path / "fake.pth", weights="fake_score")


def test_pth_to_dcp_select_strip_prefix_and_cast(tmp_path):
    state = {"ema": {f"module.{k}": v for k, v in model_state(torch.float32).items()}, "step": 5}
    torch.save(state, tmp_path / "wrapped.pth")
    pth_to_dcp(tmp_path / "wrapped.pth", tmp_path / "out.dcp", select="ema", strip_prefix="auto", dtype=torch.float16)
    dcp_to_pth(tmp_path / "out.dcp", tmp_path / "out.pth")
    expected = {k: v.half() if v.is_floating_point() else v for k, v in model_state(torch.float32).items()}
    assert_same_tensors(torch.load(tmp_path / "out.pth", weights_only=True), expected)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pth_to_dcp(tmp_path / "wrapped.pth", tmp_path / "out.dcp", select="ema")


def test_damaged_source_is_named_and_leaves_no_output(tmp_path):
    """A flipped byte in the source fails its CRC: the error names the file and tensor, no half output remains."""
    torch.save(model_state(), tmp_path / "model.pth")
    pth_to_dcp(tmp_path / "model.pth", tmp_path / "model.dcp")
    shard = flip_tensor_byte(tmp_path / "model.dcp")
    with pytest.raises(CheckpointCorruptError, match=rf"{shard}: tensor '.*' fails its CRC-32"):
        dcp_to_pth(tmp_path / "model.dcp", tmp_path / "back.pth")
    assert not (tmp_path / "back.pth").exists() and list(tmp_path.glob(".back.pth*")) == []
    os.truncate(tmp_path / "model.pth", 5000)
    with pytest.raises(Exception, match="model.pth"):
        pth_to_dcp(tmp_path / "model.pth", tmp_path / "again.dcp")


_MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from rcm.checkpoint.convert import dcp_to_pth, pth_to_dcp
    src, work = sys.argv[1], sys.argv[2]
    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = peak_mib()
    pth_to_dcp(src, work + "/m.dcp", dtype=torch.bfloat16)
    after_to_dcp = peak_mib()
    dcp_to_pth(work + "/m.dcp", work + "/m.pth", dtype=torch.float32)
    print(json.dumps({"before": before, "to_dcp": after_to_dcp, "to_pth": peak_mib()}))
""")


def test_conversion_memory_stays_at_a_few_tensors(tmp_path):
    """Converting a 384 MiB checkpoint of 16 MiB tensors (with casts) raises peak memory by far less than its size."""
    torch.save({f"layer{i}.weight": torch.full((2048, 2048), float(i)) for i in range(24)}, tmp_path / "big.pth")
    result = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "big.pth"), str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    assert peaks["to_dcp"] - peaks["before"] < 128, peaks
    assert peaks["to_pth"] - peaks["before"] < 128, peaks
    back = torch.load(tmp_path / "m.pth", mmap=True, weights_only=True)
    assert torch.equal(back["layer23.weight"], torch.full((2048, 2048), 23.0))


@pytest.mark.parametrize("layout", ["pth", "pth_prefixed", "dcp", "dcp_prefixed", "training_dcp"])
def test_teacher_weights_from_pth_or_dcp(tmp_path, layout):
    """A teacher loads strictly from a .pth, a converted (plain) DCP — with or without a wrapper prefix — or a run."""
    teacher = tiny_dit(seed=5, dtype=torch.float32)
    prefix = "model." if layout.endswith("prefixed") else ""
    torch.save({prefix + k: v for k, v in teacher.state_dict().items()}, tmp_path / "teacher.pth")
    source = tmp_path / "teacher.pth"
    if layout.startswith("dcp"):
        pth_to_dcp(source, tmp_path / "teacher.dcp", dtype=torch.bfloat16)
        source = tmp_path / "teacher.dcp"
    elif layout == "training_dcp":
        CheckpointManager(tmp_path / "run/checkpoints").save(
            1, {"student": teacher.state_dict(), "ema": dict(teacher.named_parameters())}, {}, wait=True)
        source = tmp_path / "run"
    model = tiny_dit(seed=9, dtype=torch.float32)
    load_model_weights(model, source)
    for key, value in teacher.state_dict().items():
        expected = value.to(torch.bfloat16).float() if layout.startswith("dcp") else value
        assert torch.equal(model.state_dict()[key], expected), key
    wrong = tiny_dit(seed=9, dtype=torch.float32, dim=48, num_heads=3)
    with pytest.raises(ValueError, match="does not match the model"):
        load_model_weights(wrong, source)
