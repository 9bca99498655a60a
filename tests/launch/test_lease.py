"""One writer per run directory: the LEASE file refuses a second live writer, names it, and is taken over when its
holder is gone (dead process, old heartbeat, the same Slurm job requeued), also by racing processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcm.launch.lease import LeaseHeld, RunLease, _process_start_time, lease_run_directory
from tests.forked import run_forked

REPO = Path(__file__).resolve().parents[2]
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)


def write_holder(run_dir: Path, **fields) -> dict:
    """A lease held by someone else: by default the live parent of this process on this host, fresh, job 999."""
    record = {"host": socket.gethostname(), "pid": os.getppid(), "pid_start": _process_start_time(os.getppid()),
              "job_id": "999", "step_id": "0", "array_job_id": None, "array_task_id": None, "token": "theirs",
              "started": time.time() - 100, "heartbeat": time.time() - 5, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "LEASE").write_text(json.dumps(record))
    return record


def lease_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "LEASE").read_text())


def test_a_new_lease_records_the_holder_is_refreshed_and_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    lease = RunLease(tmp_path / "run", timeout_s=60, refresh_every_s=0.5)
    lease.acquire()
    try:
        first = lease_of(tmp_path / "run")
        assert (first["host"], first["pid"], first["job_id"], first["step_id"]) == (socket.gethostname(), os.getpid(), "4711", "3")
        assert (first["array_job_id"], first["array_task_id"]) == ("4700", "11")
        assert first["started"] <= first["heartbeat"] <= time.time()
        time.sleep(1.3)
        assert lease_of(tmp_path / "run")["heartbeat"] > first["heartbeat"]  # the thread keeps it fresh
    finally:
        lease.release()
    assert not (tmp_path / "run" / "LEASE").exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no temporary files left behind


def test_a_live_holder_is_named_and_its_lease_left_alone(tmp_path):
    holder = write_holder(tmp_path / "run")
    with pytest.raises(LeaseHeld) as refused:
        RunLease(tmp_path / "run", timeout_s=60, refresh_every_s=1).acquire()
    message = str(refused.value)
    assert "\n" not in message
    for part in (str(tmp_path / "run"), f"host {holder['host']}", f"pid {holder['pid']}", "Slurm job 999",
                 "last heartbeat 5 s ago"):
        assert part in message, (part, message)
    assert lease_of(tmp_path / "run")["token"] == "theirs"


@pytest.mark.parametrize("case", ["dead process", "old heartbeat", "same job requeued"])
def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, monkeypatch, caplog, case):
    if case == "dead process":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        write_holder(tmp_path / "run", pid=gone.pid, pid_start=None)
        expected = f"its process {gone.pid}"
    elif case == "old heartbeat":  # another host: its pid cannot be checked, only its heartbeat
        write_holder(tmp_path / "run", host="elsewhere", heartbeat=time.time() - 61)
        expected = "its heartbeat is 61 s old"
    else:  # another host, fresh heartbeat, but this is the same Slurm job after a requeue
        monkeypatch.setenv("SLURM_JOB_ID", "999")
        write_holder(tmp_path / "run", host="elsewhere")
        expected = "Slurm job 999 was requeued"
    lease = RunLease(tmp_path / "run", timeout_s=60, refresh_every_s=1, settle_s=0.05)
    lease.acquire()
    try:
        assert lease_of(tmp_path / "run")["token"] == lease.record["token"]
        assert "took over the lease" in caplog.text and expected in caplog.text
    finally:
        lease.release()


def test_a_reused_pid_does_not_keep_a_dead_holder_alive(tmp_path):
    """The holder's pid runs (our parent) but started at another time: a different process, so the lease is stale."""
    write_holder(tmp_path / "run", pid_start="1")
    lease = RunLease(tmp_path / "run", timeout_s=60, refresh_every_s=1, settle_s=0.05)
    lease.acquire()
    lease.release()


def test_a_holder_that_was_taken_over_notices_and_stops_writing(tmp_path):
    lease = RunLease(tmp_path / "run", timeout_s=60, refresh_every_s=100)
    lease.acquire()
    assert lease.refresh() and not lease.lost
    write_holder(tmp_path / "run", token="newcomer")  # it froze past the timeout and a new run took over
    assert not lease.refresh() and lease.lost
    lease.release()
    assert lease_of(tmp_path / "run")["token"] == "newcomer"  # neither overwritten nor deleted


def _contend(run_dir: str, start_at: float, results) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    lease = RunLease(run_dir, timeout_s=60, refresh_every_s=100, settle_s=0.3)
    try:
        lease.acquire()
    except LeaseHeld:
        results.put("refused")
        return
    results.put("held")
    time.sleep(1.5)  # stay alive (the others must see a live holder) until every contender has decided
    lease.release()


@pytest.mark.parametrize("stale", [False, True])
def test_of_racing_processes_exactly_one_gets_the_lease(tmp_path, stale):
    """Four processes start at the same instant on a directory with no lease (create-exclusive decides) or with a
    stale one (all take over by rename; the re-read after the pause leaves one)."""
    run_dir = tmp_path / "run"
    if stale:
        write_holder(run_dir, host="elsewhere", heartbeat=time.time() - 3600)
    start_at = time.time() + 0.5
    outcomes = sorted(run_forked(_contend, [(str(run_dir), start_at)] * 4))
    assert outcomes == ["held", "refused", "refused", "refused"]


def _rank(rank: int, run_dir: str, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        lease_run_directory(run_dir, is_main=rank == 0, world_size=2, timeout_s=60, refresh_every_s=1)
        results.put((rank, "started"))
    except LeaseHeld as error:
        results.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_every_rank_hears_that_the_main_rank_was_refused(tmp_path):
    """Only rank 0 reads the lease; rank 1 gets the same one-sentence refusal through the start collective."""
    write_holder(tmp_path / "run")
    answers = dict(run_forked(_rank, [(r, str(tmp_path / "run"), str(tmp_path / "init")) for r in range(2)]))
    assert answers[0] == answers[1] and "is in use by another run" in answers[0] and "Slurm job 999" in answers[0]


def test_the_training_cli_refuses_a_leased_run_directory_in_one_sentence(toy_setup, tmp_path):
    """`python -m rcm.train` on a directory another live run holds: exit 1, one line naming the holder, no traceback,
    and no training file written into the directory."""
    from tests.launch.toy_run import toy_overrides

    run_dir = tmp_path / "run"
    write_holder(run_dir)
    result = subprocess.run([sys.executable, "-m", "rcm.train", *toy_overrides(toy_setup, 2, save_every=2),
                             f"run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("rcm.train: error: run directory"), result.stderr[-2000:]
    assert f"pid {os.getppid()}" in error_lines[0] and "Slurm job 999" in error_lines[0]
    # Hydra's own files aside (each launch has its own directory under launches/), nothing of the run was written.
    assert sorted(p.name for p in run_dir.iterdir()) == ["LEASE", "launches"]
    assert {p.name for p in next((run_dir / "launches").iterdir()).iterdir()} <= {".hydra", "train.log"}
    assert lease_of(run_dir)["token"] == "theirs"


@pytest.mark.slurm
def test_a_requeued_slurm_job_takes_over_its_own_lease_at_once(tmp_path):
    """Segment 0 takes the lease and is killed by `scontrol requeue` without releasing it; segment 1 (same job id)
    takes it over at once, with a fresh heartbeat on the file, saying why."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
cd {REPO}
exec {sys.executable} -c '
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from rcm.launch.lease import RunLease
lease = RunLease("{run_dir}", timeout_s=600, refresh_every_s=0.5, settle_s=0.1)
lease.acquire()
print("HELD", os.environ.get("SLURM_RESTART_COUNT", "0"), flush=True)
if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
    lease.release()
    sys.exit(0)
time.sleep(120)  # killed by the requeue (SIGTERM, no handler): the lease is left behind
'
""")
    job_id = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append", "-J", f"lease-{os.getpid()}",
                             "-o", str(log), str(script)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.time() + 60
        while not (log.is_file() and "HELD 0" in log.read_text()):
            assert time.time() < deadline, "segment 0 never took the lease"
            time.sleep(0.2)
        left = lease_of(run_dir)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        deadline = time.time() + 120
        while "HELD 1" not in log.read_text():
            assert time.time() < deadline, f"segment 1 never took the lease: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        text = log.read_text()
        assert f"Slurm job {job_id} was requeued" in text and "took over the lease" in text
        assert left["job_id"] == job_id and left["pid"] is not None
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_a_run_that_lost_its_lease_stops_before_saving(toy_setup, tmp_path):
    """The refresh found another holder: the loop ends at the next iteration, before its checkpoint is written."""
    import torch

    from rcm.config import load_config
    from rcm.parallel.distributed import DistributedInfo
    from rcm.train import Trainer
    from tests.launch.toy_run import toy_overrides

    run_dir = tmp_path / "run"
    trainer = Trainer(load_config([*toy_overrides(toy_setup, 4, save_every=1), f"run_dir={run_dir}"]),
                      torch.device("cpu"), DistributedInfo())
    lease = RunLease(run_dir, timeout_s=60, refresh_every_s=100)
    lease.acquire()
    write_holder(run_dir, token="newcomer")
    assert not lease.refresh()
    with pytest.raises(LeaseHeld, match="lost the lease .* at iteration 1"):
        trainer.run(lease=lease)
    assert not list(run_dir.glob("checkpoints/iter_*"))
    lease.release()
