"""The one load path of every consumer (generate, evaluate, the data builder, conversion, a teacher):
`resolve_checkpoint` verifies, a run directory falls back from a damaged checkpoint with a warning naming the damaged
file, nothing usable is one sentence naming the files; `load_model_weights` refuses non-finite weights and files that
are not state dicts."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from rcm.checkpoint import weights as weights_module
from rcm.checkpoint.layout import CheckpointCorruptError, NotACheckpointError
from rcm.checkpoint.manager import CheckpointManager
from rcm.checkpoint.torch_zip import read_records
from rcm.checkpoint.weights import load_model_weights, resolve_checkpoint
from rcm.eval.networks import NetworkSource
from tests.checkpoint.damage import flip_tensor_byte


def linear(seed: int) -> nn.Linear:
    """A 6→5 linear layer with seeded weights."""
    torch.manual_seed(seed)
    return nn.Linear(6, 5)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with checkpoints at iterations 1 and 2 of a linear layer (student and EMA, EMA = seed + 10)."""
    manager = CheckpointManager(tmp_path / "run/checkpoints", keep_last=5)
    for iteration in (1, 2):
        student, ema = linear(iteration), linear(iteration + 10)
        manager.save(iteration, {"student": student.state_dict(), "ema": dict(ema.named_parameters())},
                     {"iteration": iteration}, wait=True)
    return tmp_path / "run"


def ema_of(iteration: int) -> dict[str, torch.Tensor]:
    return linear(iteration + 10).state_dict()


def loaded(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def flip_exponent_bit(checkpoint: Path) -> None:
    """Flip the top exponent bit of the first float32 of the largest tensor: a weight becomes huge or NaN-like."""
    from rcm.checkpoint.verify import read_metadata

    metadata = read_metadata(checkpoint)
    info = max(metadata.storage_data.values(), key=lambda item: item.length)
    shard = checkpoint / info.relative_path
    fd = os.open(shard, os.O_RDWR)
    try:
        record = next(r for r in read_records(fd, info.offset, info.length) if r.is_storage)
        byte = os.pread(fd, 4, record.data_offset)
        os.pwrite(fd, byte[:3] + bytes([byte[3] ^ 0x40]), record.data_offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["exponent bit", "truncated shard", "missing .metadata"])
def test_a_run_directory_falls_back_from_a_damaged_latest_checkpoint(run_dir, caplog, damage):
    """The damage kinds of the issue: the consumer loads the previous checkpoint's EMA and warns, naming the file."""
    latest = run_dir / "checkpoints/iter_000000002"
    if damage == "exponent bit":
        flip_exponent_bit(latest)
        named = latest / "__0_0.distcp"
    elif damage == "truncated shard":
        shard = latest / "__0_0.distcp"
        os.truncate(shard, shard.stat().st_size // 2)
        named = shard
    else:
        (latest / ".metadata").unlink()
        named = latest / ".metadata"
    model = linear(0)
    with caplog.at_level(logging.WARNING):
        assert load_model_weights(model, run_dir, prefer="ema") == "ema"
    assert all(torch.equal(loaded(model)[k], v) for k, v in ema_of(1).items())
    assert "skipping damaged checkpoint" in caplog.text and str(named) in caplog.text


def test_every_checkpoint_damaged_is_one_sentence_naming_the_files(run_dir):
    shards = [flip_tensor_byte(run_dir / f"checkpoints/iter_00000000{i}") for i in (1, 2)]
    with pytest.raises(CheckpointCorruptError) as error:
        resolve_checkpoint(run_dir)
    message = str(error.value)
    assert message.startswith("every checkpoint in") and all(str(shard) in message for shard in shards)
    assert "\n" not in message and message.endswith("or name an intact checkpoint or weights file instead of the run "
                                                     "directory")  # not training's remedy


def test_a_named_damaged_checkpoint_or_pth_is_an_error_not_a_fallback(run_dir, tmp_path):
    """A checkpoint the user names explicitly is not swapped for another one: its damage is the error."""
    shard = flip_tensor_byte(run_dir / "checkpoints/iter_000000002")
    with pytest.raises(CheckpointCorruptError, match=rf"checkpoint .*iter_000000002 is damaged: {shard}.*CRC-32"):
        load_model_weights(linear(0), run_dir / "checkpoints/iter_000000002")
    torch.save(linear(3).state_dict(), tmp_path / "model.pth")
    data = bytearray((tmp_path / "model.pth").read_bytes())
    with open(tmp_path / "model.pth", "rb") as f:
        record = next(r for r in read_records(f.fileno()) if r.is_storage)
    data[record.data_offset + 1] ^= 0x04
    (tmp_path / "model.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path / 'model.pth'}: CRC-32 mismatch"):
        load_model_weights(linear(0), tmp_path / "model.pth")


def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path):
    """NaN that no checksum flags (a diverged run saved it): an error, never NaN samples."""
    state = linear(4).state_dict()
    state["bias"][2] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    model = linear(0)
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path / 'nan.pth'} holds non-finite weights .*in bias"):
        load_model_weights(model, tmp_path / "nan.pth")


@pytest.mark.parametrize("content, description", [
    ([1, 2, 3], "holds a list of 3 items, not a state dict"),
    (torch.ones(2, 3), "holds a single tensor of shape (2, 3), not a state dict"),
])
def test_a_pth_that_is_not_a_state_dict_is_named_with_what_it_holds(tmp_path, content, description):
    torch.save(content, tmp_path / "odd.pth")
    with pytest.raises(NotACheckpointError) as error:
        load_model_weights(linear(0), tmp_path / "odd.pth")
    assert str(error.value) == f"{tmp_path / 'odd.pth'} {description} of network weights"


def test_a_text_file_is_not_a_torch_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello world\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(NotACheckpointError, match=rf"^{tmp_path / 'notes.txt'} is not a torch checkpoint .*'hell'"):
        load_model_weights(linear(0), tmp_path / "notes.txt")
    with pytest.raises(NotACheckpointError, match=rf"^{tmp_path / 'empty.pth'} is empty"):
        resolve_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(NotACheckpointError, match="is not a torch checkpoint"):
        NetworkSource.open(tmp_path / "notes.txt", model="tiny")


def test_a_pre_1_6_torch_file_still_loads(tmp_path):
    """The legacy (bare pickle) format has no checksums to verify, but it is a torch checkpoint."""
    torch.save(linear(5).state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    model = linear(0)
    assert load_model_weights(model, tmp_path / "old.pth") == "pth"
    assert all(torch.equal(loaded(model)[k], v) for k, v in linear(5).state_dict().items())


def test_a_checkpoint_is_verified_once_per_process_until_a_file_changes(run_dir, monkeypatch):
    """resolve, then load, reads the CRCs once; a change to any file makes it count as unverified again."""
    calls = []
    real = weights_module.verify_together
    monkeypatch.setattr(weights_module, "verify_together", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    checkpoint = run_dir / "checkpoints/iter_000000002"
    resolve_checkpoint(checkpoint)
    load_model_weights(linear(0), checkpoint)
    assert len(calls) == 1
    flip_tensor_byte(checkpoint)
    with pytest.raises(CheckpointCorruptError):
        resolve_checkpoint(checkpoint)
    assert len(calls) == 2
