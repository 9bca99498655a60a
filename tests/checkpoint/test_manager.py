"""CheckpointManager: the completion marker, asynchronous saves, retention, damaged-checkpoint handling, and a
SIGKILL in the middle of an asynchronous save."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from rcm.checkpoint import manager as manager_module
from rcm.checkpoint.manager import COMPLETE_MARKER, CheckpointManager, is_complete, rank_file
from rcm.checkpoint.verify import CheckpointCorruptError, verify_checkpoint
from tests.checkpoint.damage import flip_tensor_byte

REPO = Path(__file__).resolve().parents[2]


def training_state(seed: int, size: int = 64) -> dict:
    """A miniature training state: weights, EMA and an optimizer entry with tensors and plain values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "student": {"w": torch.randn(size, size, generator=g), "b": torch.randn(size, generator=g)},
        "ema": {"w": torch.randn(size, size, generator=g)},
        "optim_student": {"state": {"w": {"exp_avg": torch.randn(size, size, generator=g), "step": torch.tensor(3.0)}},
                          "param_groups": [{"lr": 1e-4, "params": ["w"]}]},
    }


def zeros_like_state(state: dict) -> dict:
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like_state(v) for v in state]
    return torch.zeros_like(state) if torch.is_tensor(state) else state


def assert_state_equal(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_state_equal(a[key], b[key])
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def save(manager: CheckpointManager, iteration: int, wait: bool = True) -> Path:
    return manager.save(iteration, training_state(iteration), {"iteration": iteration, "loader": {"epoch": 0, "samples_in_epoch": iteration}}, wait=wait)


def test_async_save_writes_the_marker_only_after_the_data_is_written(tmp_path, monkeypatch):
    """The marker appears only once the background write finished; the next save waits for the one in flight."""
    release = threading.Event()

    def held_async_save(state, checkpoint_id, **kwargs):  # the real write, finishing only when the test says so
        done: Future = Future()

        def write():
            release.wait(30)
            dcp.save(state, checkpoint_id=checkpoint_id)
            done.set_result(None)
        threading.Thread(target=write).start()
        return done

    monkeypatch.setattr(manager_module.dcp, "async_save", held_async_save)
    manager = CheckpointManager(tmp_path, async_save=True)
    first = save(manager, 10, wait=False)
    assert not is_complete(first), "the marker must wait for the data"
    assert manager.latest() is None
    release.set()
    save(manager, 20, wait=False)  # waits for iteration 10 before starting
    assert is_complete(first)
    manager.wait()
    assert is_complete(manager.path_for(20)) and manager.latest() == manager.path_for(20)
    assert json.loads((first / COMPLETE_MARKER).read_text())["async"] is True


def test_async_save_round_trip_and_rank_state(tmp_path):
    """An asynchronous save loads back exactly, including the per-rank state; training may overwrite tensors at once."""
    manager = CheckpointManager(tmp_path, async_save=True)
    state = training_state(1)
    path = manager.save(5, state, {"iteration": 5, "note": "rank zero"})
    state["student"]["w"].add_(1.0)  # a training step mutating weights while the write is in flight
    manager.wait()
    loaded = zeros_like_state(state)
    assert manager.load(path, loaded) == {"iteration": 5, "note": "rank zero"}
    assert_state_equal(loaded, training_state(1))


def test_keep_last_and_keep_every(tmp_path):
    """Retention keeps the newest k plus every n-th; older leftovers of crashed saves are removed."""
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=20, async_save=False)
    crashed = manager.path_for(3)
    crashed.mkdir(parents=True)
    (crashed / "__0_0.distcp").write_bytes(b"partial")
    for iteration in (10, 20, 30, 40, 50):
        save(manager, iteration)
    kept = [path.name for _, path in manager.complete_checkpoints()]
    assert kept == ["iter_000000020", "iter_000000040", "iter_000000050"]
    assert not crashed.exists()


def test_latest_loadable_skips_a_damaged_checkpoint_with_a_warning(tmp_path, caplog):
    """A flipped byte in a shard fails its CRC: verify names the file and item, and resume falls back a checkpoint."""
    manager = CheckpointManager(tmp_path, keep_last=5)
    older = save(manager, 1)
    newer = save(manager, 2)
    shard = flip_tensor_byte(newer)  # inside a tensor's bytes: torch.load would not notice
    problems = verify_checkpoint(newer)
    assert problems and str(shard) in problems[0] and "CRC-32" in problems[0] and "item '" in problems[0]
    with caplog.at_level(logging.WARNING):
        assert manager.latest_loadable() == older
    assert "skipping damaged checkpoint" in caplog.text and str(shard) in caplog.text
    assert manager.latest() == newer  # the marker alone does not vouch for the bytes


def test_truncated_shard_gives_an_error_naming_the_file(tmp_path):
    """Loading a checkpoint whose shard was cut short fails with a message that names the shard."""
    manager = CheckpointManager(tmp_path)
    path = save(manager, 7)
    shard = path / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 3)
    with pytest.raises(CheckpointCorruptError, match=rf"{shard}.*truncated"):
        manager.load(path, zeros_like_state(training_state(7)))
    with pytest.raises(CheckpointCorruptError, match=rf"every checkpoint in {tmp_path} is damaged \({shard} is truncated"):
        manager.latest_loadable()  # not a silent restart: the run's work would be thrown away
    assert CheckpointManager(tmp_path, restart_if_all_damaged=True).latest_loadable() is None


def test_damaged_rank_file_and_metadata_are_named(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = save(manager, 4)
    rank_file(path, 0).write_bytes(b"garbage")
    with pytest.raises(CheckpointCorruptError, match="rank_00000.pt"):
        manager.load(path, zeros_like_state(training_state(4)))
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointCorruptError, match=r"\.metadata is unreadable"):
        manager.load(path, zeros_like_state(training_state(4)))


_KILLED_CHILD = textwrap.dedent("""
    import os, sys, threading, time, torch
    from rcm.checkpoint.manager import CheckpointManager
    directory = sys.argv[1]
    manager = CheckpointManager(directory, async_save=True)
    g = torch.Generator().manual_seed(0)
    manager.save(1, {"student": {"w": torch.full((256, 256), 1.0)}}, {"iteration": 1}, wait=True)
    real_fsync = os.fsync
    def stalled_fsync(fd):  # the background writer hangs at its fsync, as on a slow file system
        if threading.current_thread() is not threading.main_thread():
            time.sleep(600)
        real_fsync(fd)
    os.fsync = stalled_fsync
    manager.save(2, {"student": {"w": torch.randn(2048, 2048, generator=g)}}, {"iteration": 2})
    print("saving in the background", flush=True)
    time.sleep(600)
""")


def test_sigkill_during_async_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL while the background write is in flight: no marker, latest is the previous checkpoint, which loads."""
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = child.stdout.readline()
        assert "saving in the background" in line, child.stderr.read() if child.poll() is not None else line
        in_flight = tmp_path / "iter_000000002"
        deadline = time.time() + 60
        while not any(f.stat().st_size for f in in_flight.glob("*.distcp")) and time.time() < deadline:
            time.sleep(0.05)
        assert any(in_flight.glob("*.distcp")) and (in_flight / "rank_00000.pt").is_file()  # the write is under way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    manager = CheckpointManager(tmp_path)
    assert not is_complete(in_flight)
    assert manager.latest() == manager.latest_loadable() == tmp_path / "iter_000000001"
    loaded = {"student": {"w": torch.zeros(256, 256)}}
    assert manager.load(manager.latest(), loaded) == {"iteration": 1}
    assert torch.equal(loaded["student"]["w"], torch.full((256, 256), 1.0))


@pytest.mark.parametrize("stager", ["rcm", "dcp"])
def test_async_save_from_a_writer_process_round_trips(tmp_path, stager):
    """async_mode='process': DCP's writer process (not this one) writes shared-memory staged tensors; the state,
    mutated right after save() returns, loads back as saved; a one-process run gets and frees a private group."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import _async_process_executor

    manager = CheckpointManager(tmp_path, async_save=True, async_mode="process")
    if stager == "dcp":  # the fallback for tensor subclasses rcm's stager does not know
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        manager._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=True,
                                                       use_async_staging=False, use_non_blocking_copy=False))
    state = training_state(7)
    path = manager.save(5, state, {"iteration": 5})
    assert dist.is_initialized() and manager._own_default_group
    state["student"]["w"].add_(1.0)
    manager.wait()
    writer = _async_process_executor._CHECKPOINT_PROCESS
    assert writer is not None and writer._save_process.pid != os.getpid()
    loaded = zeros_like_state(state)
    assert manager.load(path, loaded) == {"iteration": 5}
    assert_state_equal(loaded, training_state(7))
    manager.close()
    assert not dist.is_initialized()


def test_process_mode_falls_back_to_a_thread_when_files_would_run_out(tmp_path, monkeypatch, caplog):
    """With a hard open-file limit below one descriptor per tensor, the save warns and writes from a thread."""
    monkeypatch.setattr(manager_module, "_raise_open_file_limit", lambda needed: False)
    manager = CheckpointManager(tmp_path, async_save=True, async_mode="process")
    with caplog.at_level(logging.WARNING):
        path = manager.save(3, training_state(3), {"iteration": 3}, wait=True)
    assert "writing from a thread instead" in caplog.text and manager.async_mode == "thread"
    loaded = zeros_like_state(training_state(3))
    manager.load(path, loaded)
    assert_state_equal(loaded, training_state(3))
    manager.close()


def test_unknown_async_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="async_mode must be one of"):
        CheckpointManager(tmp_path, async_mode="fork")


def test_async_saves_reuse_one_set_of_staging_buffers_even_if_dcp_closes_the_stager(tmp_path):
    """The staging buffers survive DCP closing the stager after a save (as some torch releases do): the second
    save refills the first save's buffers, holds a class object in its state, and both load back exactly."""
    manager = CheckpointManager(tmp_path, async_save=True)
    state = training_state(1)
    state["meta"] = {"optimizer_class": torch.optim.AdamW}  # a type: the object DCP's closed stager failed on
    first = manager.save(1, state, {"iteration": 1}, wait=True)
    stager = manager._stager
    buffers = {path: buffer.data_ptr() for path, buffer in stager.buffers.items()}
    assert len(buffers) == 5  # every tensor of the state staged once
    stager.close()  # what DCP may do after a save
    second_state = training_state(2)
    second_state["meta"] = state["meta"]
    second = manager.save(2, second_state, {"iteration": 2}, wait=True)
    assert manager._stager is stager
    assert {path: buffer.data_ptr() for path, buffer in stager.buffers.items()} == buffers
    for path, seed in ((first, 1), (second, 2)):
        loaded = zeros_like_state(training_state(seed))
        manager.load_entries(path, loaded)
        assert_state_equal(loaded, training_state(seed))
    manager.close()
    assert manager._stager is None and not stager.buffers  # the manager's close frees them


class Tagged(torch.Tensor):
    """A tensor subclass for the staging fallback test (module level: the write pickles its class)."""


def test_a_tensor_subclass_falls_back_to_dcps_stager(tmp_path, caplog):
    """rcm's stager knows plain tensors and DTensors; any other tensor subclass is staged by DCP's stager."""
    manager = CheckpointManager(tmp_path, async_save=True)
    state = training_state(4)
    state["student"]["w"] = state["student"]["w"].as_subclass(Tagged)
    with caplog.at_level(logging.WARNING):
        path = manager.save(4, state, {"iteration": 4}, wait=True)
    assert "cannot stage a Tagged" in caplog.text and "DefaultStager" in caplog.text
    loaded = zeros_like_state(training_state(4))
    with torch.serialization.safe_globals([Tagged]):  # DCP's reader loads weights-only
        manager.load_entries(path, loaded)
    assert_state_equal(loaded, training_state(4))
    manager.close()


def test_shared_memory_staging_buffers_are_page_locked_for_cuda_tensors(monkeypatch):
    """For a writer process, CUDA tensors are staged into shared memory that is also page-locked (registered with
    CUDA, unregistered when the buffer is freed) and copied non-blocking; when registering fails the stager warns
    once and stages into plain shared memory. CPU stands in for CUDA: the copies and the registration are recorded."""
    from torch.cuda import _pin_memory_utils

    registered, unregistered, copies = [], [], []
    monkeypatch.setattr(_pin_memory_utils, "pin_memory", lambda ptr, size: registered.append((ptr, size)))
    monkeypatch.setattr(_pin_memory_utils, "unpin_memory", lambda ptr: unregistered.append(ptr))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # every tensor "lives on the GPU"
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: (
        copies.append(non_blocking), real_copy(self, src))[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no synchronize after staging

    stager = manager_module._PlainTensorStager(shared_memory=True)
    state = training_state(5)
    staged = stager.stage(state)
    assert_state_equal(staged, state)
    buffers = list(stager.buffers.values())
    assert all(buffer.is_shared() for buffer in buffers)
    assert sorted(registered) == sorted((b.data_ptr(), b.nbytes) for b in buffers)
    assert copies == [True] * len(buffers)
    pointers = {b.data_ptr() for b in buffers}
    del staged, buffers
    stager.release()
    import gc
    gc.collect()
    assert set(unregistered) == pointers

    def refuse(ptr, size):
        raise RuntimeError("Registering memory failed with cudaError: 1")

    monkeypatch.setattr(_pin_memory_utils, "pin_memory", refuse)
    copies.clear()
    fallback = manager_module._PlainTensorStager(shared_memory=True)
    assert_state_equal(fallback.stage(state), state)
    assert not fallback._can_pin_shared and copies == [False] * len(fallback.buffers)


@pytest.mark.parametrize("mode,short_of", [("thread", "host"), ("process", "shm")])
def test_async_save_without_memory_for_its_buffers_saves_synchronously(tmp_path, monkeypatch, caplog, mode, short_of):
    """Staging needs a copy of the state in host (thread) or shared (process) memory; without room the first save
    warns, writes synchronously and every later save does too, instead of swapping or being OOM-killed."""
    state_bytes = 3 * 64 * 64 * 4 + 64 * 4 + 4  # three 64×64 float32 tensors, a bias and a scalar step
    assert manager_module._tensor_bytes(training_state(1)) == state_bytes
    plenty, little = 100 * state_bytes, state_bytes  # 0.9 × little is less than the state
    monkeypatch.setattr(manager_module, "_host_memory_available", lambda: little if short_of == "host" else plenty)
    monkeypatch.setattr(manager_module, "_shared_memory_available", lambda: little if short_of == "shm" else plenty)
    manager = CheckpointManager(tmp_path, async_save=True, async_mode=mode)
    with caplog.at_level(logging.WARNING):
        first = manager.save(1, training_state(1), {"iteration": 1})
    where = "host memory" if short_of == "host" else "/dev/shm"
    assert "saving synchronously" in caplog.text and where in caplog.text
    assert is_complete(first) and not manager.in_flight and manager._stager is None and not manager.async_save
    second = manager.save(2, training_state(2), {"iteration": 2})
    assert is_complete(second)
    for path, seed in ((first, 1), (second, 2)):
        loaded = zeros_like_state(training_state(seed))
        manager.load_entries(path, loaded)
        assert_state_equal(loaded, training_state(seed))
    manager.close()


def test_async_save_with_room_for_its_buffers_stays_asynchronous(tmp_path, monkeypatch):
    monkeypatch.setattr(manager_module, "_host_memory_available", lambda: 10 * manager_module._tensor_bytes(training_state(1)))
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, training_state(1), {"iteration": 1}, wait=True)
    assert manager.async_save and isinstance(manager._stager, manager_module._PlainTensorStager)
    manager.close()


def _memory_vote_worker(rank: int, world_size: int, root: str) -> None:
    """Rank 1's node is short of memory: both ranks must save synchronously (DCP collectives must match)."""
    import torch.distributed as dist

    from rcm.parallel.distributed import DistributedInfo

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world_size)
    try:
        manager_module._host_memory_available = (lambda: 1) if rank == 1 else (lambda: 2**40)
        manager = CheckpointManager(Path(root) / "ckpt", DistributedInfo(rank=rank, world_size=world_size), async_save=True)
        path = manager.save(3, {"part": {f"rank{rank}": torch.full((4,), float(rank))}}, {"rank": rank})
        torch.save({"async_save": manager.async_save, "complete": is_complete(path)}, Path(root) / f"result{rank}.pt")
        manager.close()
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_save_synchronously_when_one_node_is_short(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_memory_vote_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result{rank}.pt") for rank in range(2)]
    assert results == [{"async_save": False, "complete": True}] * 2
