"""`python -m checkpoints_util`: every subcommand has --help; inspect, verify and both conversions work end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints_util.__main__ import main
from rcm.checkpoint.manager import CheckpointManager
from tests.checkpoint.damage import flip_tensor_byte
from tests.helpers import tiny_dit

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("inspect", "verify", "pth-to-dcp", "dcp-to-pth")


def test_module_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "checkpoints_util", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(name in result.stdout for name in SUBCOMMANDS)


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_subcommand_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with two complete checkpoints of a tiny DiT (student + EMA) and one interrupted save."""
    model = tiny_dit(seed=1, dtype=torch.float32)
    manager = CheckpointManager(tmp_path / "run/checkpoints", keep_last=5)
    for iteration in (2, 4):
        manager.save(iteration, {"student": model.state_dict(), "ema": dict(model.named_parameters())}, {"iteration": iteration}, wait=True)
    (tmp_path / "run/checkpoints/iter_000000006").mkdir()
    return tmp_path / "run"


def test_inspect_run_checkpoint_and_pth(run_dir, tmp_path, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "iter_000000004  complete" in out and "iter_000000006  INCOMPLETE" in out and "latest complete: iter_000000004" in out
    assert main(["inspect", str(run_dir / "checkpoints/iter_000000004")]) == 0
    out = capsys.readouterr().out
    assert "student.head.head.weight" in out and "step: 4" in out and "ema" in out
    torch.save(tiny_dit(dtype=torch.float32).state_dict(), tmp_path / "m.pth")
    assert main(["inspect", "--summary", str(tmp_path / "m.pth")]) == 0
    assert "total:" in capsys.readouterr().out


def test_verify_reports_the_damaged_file(run_dir, capsys):
    assert main(["verify", str(run_dir / "checkpoints/iter_000000004")]) == 0
    shard = flip_tensor_byte(run_dir / "checkpoints/iter_000000004")
    capsys.readouterr()
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: item '" in out and "CRC-32 mismatch" in out
    assert "iter_000000002: ok" in out and "iter_000000006: DAMAGED" in out  # the interrupted save has no metadata


def test_conversions_from_the_command_line(run_dir, tmp_path, capsys):
    """A run's EMA as a bf16 .pth, back to DCP, and loaded as a strict state dict."""
    assert main(["dcp-to-pth", str(run_dir), str(tmp_path / "ema.pth"), "--weights", "ema", "--dtype", "bf16"]) == 0
    ema = torch.load(tmp_path / "ema.pth", weights_only=True)
    model = tiny_dit(seed=1, dtype=torch.float32)
    assert all(ema[k].dtype == torch.bfloat16 and torch.equal(ema[k], v.detach().bfloat16()) for k, v in model.named_parameters())
    assert main(["pth-to-dcp", str(tmp_path / "ema.pth"), str(tmp_path / "ema.dcp"), "--add-prefix", "net."]) == 0
    assert main(["dcp-to-pth", str(tmp_path / "ema.dcp"), str(tmp_path / "plain.pth"), "--strip-prefix", "auto"]) == 0
    assert torch.load(tmp_path / "plain.pth", weights_only=True).keys() == ema.keys()
    capsys.readouterr()
    assert main(["dcp-to-pth", str(tmp_path / "ema.dcp"), str(tmp_path / "plain.pth")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_official_safetensors_shards_inspect_and_convert_to_dcp(tmp_path, capsys):
    """The 14B's published layout (shards + index): inspect lists every tensor from the headers; pth-to-dcp
    converts it into a DCP checkpoint (bf16 on request) that loads strictly into the DiT."""
    import json

    safetensors_torch = pytest.importorskip("safetensors.torch")
    from rcm.checkpoint.weights import load_model_weights

    state = {k: v.float().contiguous() for k, v in tiny_dit(4).state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    source = tmp_path / "Wan2.1-T2V-tiny"
    source.mkdir()
    for file, keys in shards.items():
        safetensors_torch.save_file({k: state[k] for k in keys}, source / file)
    (source / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: file for file, keys in shards.items() for k in keys}}))

    assert main(["inspect", str(source)]) == 0
    out = capsys.readouterr().out
    assert "head.head.weight" in out and "float32" in out and str(len(names)) in out

    assert main(["pth-to-dcp", str(source), str(tmp_path / "teacher.dcp"), "--dtype", "bf16"]) == 0
    assert f"{len(names)} tensors" in capsys.readouterr().out
    target = tiny_dit(5)
    assert load_model_weights(target, tmp_path / "teacher.dcp") == "dcp"
    for name, value in target.state_dict().items():
        assert torch.equal(value, state[name].to(torch.bfloat16).float()), name
    assert main(["pth-to-dcp", str(source), str(tmp_path / "other.dcp"), "--select", "ema"]) == 2
    assert "--select applies to torch.save files" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ("text", "is not a torch checkpoint (torch.save files are zip archives starting with 'PK'; this one starts with 'hell')"),
    ([1, 2, 3], "holds a list of 3 items, not a state dict: it is no checkpoint"),
    (torch.ones(2), "holds a single tensor of shape (2,), not a state dict: it is no checkpoint"),
    ({"step": 3}, "holds a dict without any tensor (1 keys), not a checkpoint"),
])
def test_inspect_of_something_that_is_no_checkpoint_fails_in_one_line(tmp_path, capsys, content, expected):
    """inspect on a text file, or a .pth holding a list, a tensor or no tensor: exit 2, one line naming the file."""
    path = tmp_path / "odd.pth"
    path.write_text("hello world\n") if content == "text" else torch.save(content, path)
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path} {expected}\n" and "total:" not in captured.out


def test_pth_to_dcp_onto_an_existing_checkpoint_or_from_a_directory(tmp_path, capsys):
    """Onto an existing DCP directory: says it exists and how to overwrite (which then works); a DCP directory as
    the source: says it is a directory, not a torch.save file."""
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pth")
    assert main(["pth-to-dcp", str(tmp_path / "m.pth"), str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["pth-to-dcp", str(tmp_path / "m.pth"), str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'd'} exists (a DCP checkpoint directory); pass --overwrite "
                                       "to replace it, or choose another destination\n")
    torch.save({"w": torch.zeros(3)}, tmp_path / "m.pth")
    assert main(["pth-to-dcp", str(tmp_path / "m.pth"), str(tmp_path / "d"), "--overwrite"]) == 0
    assert main(["dcp-to-pth", str(tmp_path / "d"), str(tmp_path / "back.pth")]) == 0
    assert torch.equal(torch.load(tmp_path / "back.pth")["w"], torch.zeros(3))
    capsys.readouterr()
    assert main(["pth-to-dcp", str(tmp_path / "d"), str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'd'} is a directory, not a torch.save file")


def test_the_module_fails_without_a_traceback(tmp_path):
    """`python -m checkpoints_util inspect notes.txt`: exit status 2 and one line on stderr."""
    (tmp_path / "notes.txt").write_text("hello world\n")
    result = subprocess.run([sys.executable, "-m", "checkpoints_util", "inspect", str(tmp_path / "notes.txt")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is not a torch checkpoint" in result.stderr and "Traceback" not in result.stderr
