"""The training loop's side of fault tolerance, without Slurm: stop signal -> checkpoint -> exit -> resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from rcm.checkpoint.manager import is_complete
from rcm.config import load_config
from rcm.launch.signals import StopRequest
from rcm.parallel.distributed import DistributedInfo
from rcm.train import Trainer
from tests.launch.toy_run import toy_overrides

REPO = Path(__file__).resolve().parents[2]


def test_stop_signal_ends_the_run_after_a_checkpoint_of_the_current_iteration(toy_setup, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(load_config([*toy_overrides(toy_setup, 8, save_every=100), f"run_dir={run_dir}"]),
                      torch.device("cpu"), DistributedInfo())
    step = trainer.step

    def step_then_preempt():
        logs = step()
        if trainer.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the iteration in progress still completes
        return logs

    trainer.step = step_then_preempt
    stop = StopRequest().install()
    try:
        logs = trainer.run(stop)
    finally:
        stop.uninstall()
    assert logs["stopped_by"] == "SIGTERM" and trainer.iteration == 3
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["iter_000000003"]
    assert is_complete(run_dir / "checkpoints" / "iter_000000003")


def _start(overrides: list[str], **extra_env: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    return subprocess.Popen([sys.executable, "-m", "rcm.train", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_iteration(heartbeat: Path, iteration: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(heartbeat.read_text())["iteration"] >= iteration:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{heartbeat} never reached iteration {iteration} (exit status {process.poll()})")


def test_cli_stops_on_usr2_with_status_140_and_the_same_command_resumes(toy_setup, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*toy_overrides(toy_setup, 40, save_every=100), f"run_dir={run_dir}"]
    process = _start(overrides)
    _wait_for_iteration(run_dir / "heartbeats" / "rank_00000.json", 2, process)
    process.send_signal(signal.SIGUSR2)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR2, output[-3000:]
    assert "run the same command again to resume" in output
    saved = [p for p in (run_dir / "checkpoints").iterdir() if is_complete(p)]
    assert len(saved) == 1 and 2 <= int(saved[0].name[5:]) < 40

    resumed = _start(overrides)
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {saved[0]}" in output and "finished 40 iterations" in output


def test_a_failing_run_exits_1_with_one_sentence_and_its_traceback_on_request(toy_setup, tmp_path):
    """The failure is one line naming the file; RCM_DEBUG=1 adds the traceback to the log."""
    overrides = [*toy_overrides(toy_setup, 4, save_every=100), f"run_dir={tmp_path / 'run'}",
                 "distill.teacher_checkpoint=/nonexistent/teacher.pth"]
    process = _start(overrides)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback" not in output and output.strip().splitlines()[-1].startswith("rcm.train: error: ")
    assert "/nonexistent/teacher.pth" in output.strip().splitlines()[-1]
    process = _start(overrides, RCM_DEBUG="1")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback (most recent call last)" in output and "/nonexistent/teacher.pth" in output
