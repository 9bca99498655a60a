"""Checkpoint integrity (issue #22): a damaged checkpoint is replaced, never kept, when its iteration is saved again;
every checkpoint damaged is an error naming the files unless starting over is allowed; a damaged marker is caught;
a full disk is reported as such in every save mode."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rcm.checkpoint import manager as manager_module
from rcm.checkpoint.layout import COMPLETE_MARKER, CheckpointCorruptError
from rcm.checkpoint.manager import CheckpointManager, is_complete
from rcm.checkpoint.verify import verify_checkpoint
from tests.checkpoint.damage import flip_tensor_byte
from tests.checkpoint.test_manager import assert_state_equal, save, training_state, zeros_like_state

REPO = Path(__file__).resolve().parents[2]


def load_state(manager: CheckpointManager, path: Path, iteration_seed: int) -> dict:
    """The DCP state of ``path`` loaded into zeros shaped like ``training_state(iteration_seed)``."""
    state = zeros_like_state(training_state(iteration_seed))
    manager.load(path, state)
    return state


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_saving_an_iteration_again_replaces_its_damaged_checkpoint(tmp_path, monkeypatch, caplog, exchange):
    """Resume skips the damaged iter 2; the next save of iteration 2 replaces it (also where the file system cannot
    exchange two directories), and the result verifies and holds the new state; no temporary directory is left."""
    if not exchange:
        monkeypatch.setattr(manager_module, "_exchange_directories", lambda a, b: False)
    first = CheckpointManager(tmp_path, keep_last=5)
    save(first, 1)
    damaged = save(first, 2)
    flip_tensor_byte(damaged)
    assert verify_checkpoint(damaged)

    resumed = CheckpointManager(tmp_path, keep_last=5)  # a new process: the requeued job
    assert resumed.latest_loadable() == tmp_path / "iter_000000001"
    new_state = training_state(2)
    new_state["student"]["w"] += 1.0  # this run's weights differ from the damaged checkpoint's
    with caplog.at_level(logging.WARNING):
        resumed.save(2, new_state, {"iteration": 2}, wait=True)
    assert "replaced the earlier checkpoint" in caplog.text
    assert verify_checkpoint(damaged) == [] and is_complete(damaged)
    assert resumed.latest_loadable() == damaged
    loaded = load_state(resumed, damaged, 2)
    assert_state_equal(loaded, new_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000000001", "iter_000000002"]


def test_a_second_save_of_the_same_iteration_by_one_manager_writes_nothing(tmp_path):
    """A stop request right after an interval save saves again at once: the checkpoint is not rewritten."""
    manager = CheckpointManager(tmp_path)
    path = save(manager, 3)
    written = (path / COMPLETE_MARKER).stat().st_mtime_ns
    manager.save(3, training_state(99), {"iteration": 3}, wait=True)
    assert (path / COMPLETE_MARKER).stat().st_mtime_ns == written
    assert_state_equal(load_state(manager, path, 3), training_state(3))


def test_async_save_over_a_damaged_checkpoint_replaces_it(tmp_path):
    """The asynchronous path replaces too: the marker goes into the replacement, which is then swapped in."""
    manager = CheckpointManager(tmp_path, async_save=True)
    flip_tensor_byte(save(manager, 5))
    manager.close()
    resumed = CheckpointManager(tmp_path, async_save=True, restart_if_all_damaged=True)
    assert resumed.latest_loadable() is None  # the only checkpoint is damaged: allowed to start over
    resumed.save(5, training_state(50), {"iteration": 5})
    resumed.wait()
    resumed.close()
    assert verify_checkpoint(tmp_path / "iter_000000005") == []
    assert_state_equal(load_state(resumed, tmp_path / "iter_000000005", 50), training_state(50))


def test_a_replacement_left_between_two_renames_is_still_found(tmp_path):
    """A crash between the two renames of the non-exchange path leaves only `.iter_N.replacing` (complete):
    it is listed for iteration N, so no moment is without a checkpoint of that iteration."""
    manager = CheckpointManager(tmp_path, keep_last=5)
    save(manager, 1)
    path = save(manager, 2)
    os.rename(path, tmp_path / ".iter_000000002.replacing")
    assert manager.latest_loadable() == tmp_path / ".iter_000000002.replacing"
    assert_state_equal(load_state(manager, manager.latest_loadable(), 2), training_state(2))
    CheckpointManager(tmp_path, keep_last=5).save(2, training_state(2), {"iteration": 2}, wait=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000000001", "iter_000000002"]  # superseded: removed


def test_every_checkpoint_damaged_is_an_error_naming_the_files(tmp_path, caplog):
    """Two damaged checkpoints: one sentence naming both damaged files; with restart_if_all_damaged a warning."""
    manager = CheckpointManager(tmp_path, keep_last=5)
    shards = [flip_tensor_byte(save(manager, 1)), flip_tensor_byte(save(manager, 2))]
    with pytest.raises(CheckpointCorruptError) as error:
        manager.latest_loadable()
    message = str(error.value)
    assert message.startswith(f"every checkpoint in {tmp_path} is damaged")
    assert all(str(shard) in message for shard in shards) and "train.restart_if_all_damaged=true" in message
    assert "\n" not in message
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(tmp_path, restart_if_all_damaged=True).latest_loadable() is None
    assert "starting over from iteration 0" in caplog.text


def test_a_lost_marker_on_an_older_checkpoint_counts_as_damage(tmp_path):
    """Only the newest save can be unfinished: an older directory whose DCP save finished but that has no marker
    lost it, so with the newer one damaged too the run stops instead of restarting from 0."""
    manager = CheckpointManager(tmp_path, keep_last=5)
    older = save(manager, 1)
    flip_tensor_byte(save(manager, 2))
    (older / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointCorruptError, match=rf"{older} has no COMPLETE marker although its save finished"):
        manager.latest_loadable()


def test_only_an_unfinished_first_save_is_a_fresh_start(tmp_path, caplog):
    """A crash during the very first save leaves one directory without marker: no error, nothing to resume."""
    (tmp_path / "iter_000000004").mkdir()
    (tmp_path / "iter_000000004" / "__0_0.distcp").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(tmp_path).latest_loadable() is None
    assert "skipping incomplete checkpoint" in caplog.text


@pytest.mark.parametrize("marker, expected", [
    ({"iteration": 3, "world_size": 0}, "world_size 0"),
    ({"iteration": 4, "world_size": 1}, "records iteration 4"),
    ({"iteration": 3}, "unreadable"),
])
def test_a_damaged_marker_fails_verification(tmp_path, marker, expected):
    """A marker whose world size or iteration was changed (e.g. a flipped digit) is damage, not a smaller world."""
    manager = CheckpointManager(tmp_path)
    path = save(manager, 3)
    (path / COMPLETE_MARKER).write_text(json.dumps(marker))
    problems = verify_checkpoint(path)
    assert problems and expected in problems[0] and str(path / COMPLETE_MARKER) in problems[0]


_DISK_FULL_CHILD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from rcm.checkpoint.manager import CheckpointManager
    root = Path(sys.argv[1])
    for mode in ("sync", "thread", "process"):
        directory = root / mode / "checkpoints"
        manager = CheckpointManager(directory, async_save=mode != "sync", async_mode="thread" if mode == "sync" else mode)
        state = {"student": {"w": torch.randn(512, 512)}}  # 1 MiB: more than the file system holds
        try:
            manager.save(1, state, {"iteration": 1}, wait=True)
            print(f"{mode}\\tsaved")
        except Exception as error:
            print(f"{mode}\\t{type(error).__name__}\\t{' '.join(str(error).split())}")
        finally:
            try:
                manager.close()
            except Exception:
                pass
""")


def test_a_full_disk_says_so_in_every_save_mode(tmp_path):
    """sync, thread and process saves onto a full file system (a 256 KiB tmpfs each, in a private mount
    namespace) fail with one sentence saying "no space left on device" and naming the checkpoint."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    root = tmp_path / "full"
    mounts = " && ".join(f"mkdir -p {root}/{mode} && mount -t tmpfs -o size=256k tmpfs {root}/{mode}"
                         for mode in ("sync", "thread", "process"))
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mounts} && true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[:200]}")
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'{mounts} && exec "{sys.executable}" -c "$0" "{root}"', _DISK_FULL_CHILD],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split("\t", 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == {"sync", "thread", "process"}, result.stdout + result.stderr[-3000:]
    for mode, outcome in lines.items():
        kind, message = outcome.split("\t", 1)
        assert kind == "CheckpointSaveError", (mode, outcome)
        assert message.startswith("no space left on device: saving checkpoint "), (mode, message)
        assert f"{root}/{mode}/checkpoints/iter_000000001" in message, (mode, message)
