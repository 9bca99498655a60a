"""After the stop checkpoint: who requeues, how often, and with which exit status."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rcm.launch import requeue
from rcm.parallel.distributed import DistributedInfo


REPO = Path(__file__).resolve().parents[2]
JOB_STATE = {"value": "JobId=4711 JobName=rcm JobState=RUNNING Reason=None Dependency=(null)"}


@pytest.fixture
def scontrol_calls(monkeypatch):
    """The `scontrol requeue` commands issued; `scontrol show job` answers with JOB_STATE."""
    calls = []
    JOB_STATE["value"] = "JobId=4711 JobName=rcm JobState=RUNNING Reason=None Dependency=(null)"

    def fake_run(command, **kwargs):
        if command[:3] == ["scontrol", "show", "job"]:
            return subprocess.CompletedProcess(command, 0, JOB_STATE["value"], "")
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(requeue.subprocess, "run", fake_run)
    for key in ("SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_rank_0_requeues_the_slurm_job_and_every_rank_exits_128_plus_signal(scontrol_calls, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(SystemExit) as stopped:
        requeue.stop_and_requeue(signal.SIGUSR2, DistributedInfo(), requeue=True, max_requeues=3)
    assert stopped.value.code == 128 + signal.SIGUSR2
    assert scontrol_calls == [["scontrol", "requeue", "4711"]]


def test_requeue_cap_and_switch(scontrol_calls, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(SystemExit):
        requeue.stop_and_requeue(signal.SIGTERM, DistributedInfo(), requeue=True, max_requeues=3)
    assert scontrol_calls == [] and "launch.max_requeues=3" in caplog.text
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(SystemExit):
        requeue.stop_and_requeue(signal.SIGTERM, DistributedInfo(), requeue=False, max_requeues=3)
    assert scontrol_calls == []


def test_only_rank_0_talks_to_slurm(scontrol_calls, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    with pytest.raises(SystemExit):
        requeue.stop_and_requeue(signal.SIGUSR2, DistributedInfo(rank=1, world_size=1), requeue=True, max_requeues=3)
    assert scontrol_calls == []


def test_submitit_local_executor_is_asked_to_restart(scontrol_calls, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    with pytest.raises(SystemExit) as stopped:
        requeue.stop_and_requeue(signal.SIGUSR2, DistributedInfo(), requeue=True, max_requeues=3)
    assert stopped.value.code == requeue.SUBMITIT_LOCAL_REQUEUE_EXIT_CODE
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    assert requeue.SUBMITIT_LOCAL_REQUEUE_EXIT_CODE == LOCAL_REQUEUE_RETURN_CODE


def test_a_failed_scontrol_is_reported_not_raised(monkeypatch, caplog):
    def failing_run(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="Requested operation is presently disabled")

    monkeypatch.setattr(requeue.subprocess, "run", failing_run)
    assert not requeue.request_slurm_requeue("4711", restarts=0, max_requeues=3)
    assert "presently disabled" in caplog.text and "resubmit" in caplog.text


@pytest.mark.parametrize("state, reason, restarts, requeued, logged", [
    ("RUNNING", "None", 0, True, "requeued job 4711 (restart 1"),  # preemption with a grace period, maintenance
    ("COMPLETING", "TimeLimit", 0, True, "requeued job 4711"),  # the time limit passed before the signal was handled
    ("COMPLETING", "None", 0, False, "job 4711 is not requeued: it was cancelled"),  # scancel: the user wants it stopped
    ("PENDING", "BeginTime", 1, False, "job 4711 is requeued by Slurm itself (state PENDING)"),  # requeued already
    # `scontrol requeue` or PreemptMode=REQUEUE while the steps are killed: COMPLETING like a cancel, but Slurm has
    # raised the restart count above this segment's (0), so the log must not say "cancelled".
    ("COMPLETING", "None", 1, False, "job 4711 is requeued by Slurm itself (state COMPLETING, restart 1)"),
])
def test_sigterm_requeues_unless_cancelled_or_already_requeued(scontrol_calls, monkeypatch, caplog, state, reason,
                                                               restarts, requeued, logged):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    JOB_STATE["value"] = (f"JobId=4711 JobName=rcm JobState={state} Reason={reason} Dependency=(null) Requeue=1 "
                          f"Restarts={restarts} BatchFlag=1")
    with caplog.at_level("INFO", logger="rcm.launch"), pytest.raises(SystemExit):
        requeue.stop_and_requeue(signal.SIGTERM, DistributedInfo(), requeue=True, max_requeues=3)
    assert (scontrol_calls == [["scontrol", "requeue", "4711"]]) == requeued
    assert logged in caplog.text
    assert ("cancelled" in caplog.text) == ("cancelled" in logged)


def test_a_later_segment_compares_the_restart_count_with_its_own(scontrol_calls, monkeypatch, caplog):
    """In the third segment (SLURM_RESTART_COUNT=2) a cancel shows Restarts=2: cancelled, not requeued by Slurm."""
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    JOB_STATE["value"] = "JobId=4711 JobState=COMPLETING Reason=None Restarts=2"
    with caplog.at_level("INFO", logger="rcm.launch"), pytest.raises(SystemExit):
        requeue.stop_and_requeue(signal.SIGTERM, DistributedInfo(), requeue=True, max_requeues=3)
    assert scontrol_calls == [] and "is not requeued: it was cancelled" in caplog.text


@pytest.mark.slurm
def test_on_the_real_slurm_a_requeue_and_a_cancel_are_told_apart(tmp_path):
    """Two batch jobs ask, on SIGTERM, why not to requeue themselves: the one `scontrol requeue`d is said to be
    requeued by Slurm, the one `scancel`led to be cancelled (both show JobState=COMPLETING at that moment)."""
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        cd {REPO}
        exec {sys.executable} -c '
        import os, signal, sys, time
        from rcm.launch.requeue import reason_not_to_requeue_on_sigterm
        def on_term(signum, frame):
            print("WHY", reason_not_to_requeue_on_sigterm(os.environ["SLURM_JOB_ID"],
                  int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)), flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("READY", flush=True)
        time.sleep(120)
        '
        """))
    jobs = {}
    for action in ("requeue", "cancel"):
        log = tmp_path / f"{action}.out"
        jobs[action] = (subprocess.run(["sbatch", "--parsable", "--requeue", "-J", f"rq-{action}-{os.getpid()}",
                                        "-o", str(log), str(script)], capture_output=True, text=True, check=True)
                        .stdout.strip().split(";")[0], log)
    try:
        deadline = time.time() + 60
        while not all(log.is_file() and "READY" in log.read_text() for _, log in jobs.values()):
            assert time.time() < deadline, "the jobs never started"
            time.sleep(0.2)
        subprocess.run(["scontrol", "requeue", jobs["requeue"][0]], check=True)
        subprocess.run(["scancel", jobs["cancel"][0]], check=True)
        deadline = time.time() + 60
        while not all("WHY" in log.read_text() for _, log in jobs.values()):
            assert time.time() < deadline, "the jobs never answered"
            time.sleep(0.2)
        assert "WHY is requeued by Slurm itself" in jobs["requeue"][1].read_text()
        assert "WHY is not requeued: it was cancelled" in jobs["cancel"][1].read_text()
    finally:
        subprocess.run(["scancel", *(job for job, _ in jobs.values())], capture_output=True)
