"""After the stop checkpoint: who requeues, how often, and with which exit status."""
from __future__ import annotations

import signal
import subprocess

import pytest

from rcm.launch import requeue
from rcm.parallel.distributed import DistributedInfo


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


@pytest.mark.parametrize("state, reason, requeued", [
    ("RUNNING", "None", True),  # preemption with a grace period, node maintenance
    ("COMPLETING", "TimeLimit", True),  # the time limit passed before the pre-timeout signal was handled
    ("COMPLETING", "None", False),  # scancel: the user wants it stopped
    ("PENDING", "BeginTime", False),  # PreemptMode=REQUEUE: Slurm requeued it already
])
def test_sigterm_requeues_unless_cancelled_or_already_requeued(scontrol_calls, monkeypatch, state, reason, requeued):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    JOB_STATE["value"] = f"JobId=4711 JobName=rcm JobState={state} Reason={reason} Dependency=(null)"
    with pytest.raises(SystemExit):
        requeue.stop_and_requeue(signal.SIGTERM, DistributedInfo(), requeue=True, max_requeues=3)
    assert (scontrol_calls == [["scontrol", "requeue", "4711"]]) == requeued
