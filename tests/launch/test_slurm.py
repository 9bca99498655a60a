"""Integration tests on a real Slurm (slurm/local_cluster.sh up): submitit jobs, signal -> checkpoint ->
requeue -> resume, Hydra sweeps, scancel during a save, a hung rank, and both sbatch templates.

Every job is a tiny toy rCM run on the CPU with 2 ranks (gloo). The local cluster has placeholder GPUs,
so the presets and templates run unchanged with --gpus-per-node=2; jobs use train.device=cpu.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rcm.checkpoint.manager import is_complete
from tests.launch.toy_run import assert_same_state, final_state, rank_states, same_value, toy_overrides

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RCM_PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
SUBMITIT_SLURM = [  # the cluster preset, shrunk to the toy: 2 "GPUs" -> 2 tasks (ranks), 1 CPU each
    "hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=2", "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
]
MAX_ITERS = 30  # long enough to signal a run mid-way (about 0.2 s per iteration with 2 ranks on 2 cores)


# -- helpers --
def squeue_ids(name: str) -> list[str]:
    """Job ids with this name still known to squeue (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return out.split()


def job_record(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def heartbeat_iteration(run_dir_glob: Path, rank: int = 0) -> int:
    """The iteration of the newest heartbeat of ``rank`` under a (globbed) run directory; -1 if none yet."""
    for path in sorted(glob.glob(str(run_dir_glob / "heartbeats" / f"rank_{rank:05d}.json"))):
        try:
            return json.loads(Path(path).read_text())["iteration"] or -1
        except (OSError, ValueError):
            pass
    return -1


def squeue_ids_by_id(job_id: str) -> list[str]:
    """[job_id] while squeue still knows the job, else []."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def wait_for_job_end(job_id: str, timeout: float) -> dict[str, str]:
    """Wait until the job left squeue; its final `scontrol show job` record."""
    wait_until(lambda: job_id not in squeue_ids_by_id(job_id), timeout, f"job {job_id} to end", interval=0.5)
    return job_record(job_id)


@pytest.fixture
def job_name(request):
    """A unique job name; whatever still runs under it is cancelled when the test ends."""
    name = f"rcmtest-{request.node.name[:20]}-{uuid.uuid4().hex[:6]}"
    yield name
    subprocess.run(["scancel", "-n", name], capture_output=True)


def start_sweep(cwd: Path, name: str, overrides: list[str]) -> subprocess.Popen:
    """`python -m rcm.train -m ...` on submitit_slurm: it submits the jobs and waits for their results."""
    command = [sys.executable, "-m", "rcm.train", "-m", *SUBMITIT_SLURM, f"hydra.launcher.name={name}", *overrides]
    return subprocess.Popen(command, cwd=cwd, env=JOB_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the launcher did not return within {timeout} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def task_logs(sweep_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")))


def sbatch(script: str, name: str, log: Path, sbatch_options: list[str], overrides: list[str]) -> str:
    command = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log}", "--time=10", *sbatch_options,
               str(REPO / "slurm" / script), *overrides]
    return subprocess.run(command, cwd=REPO, env=JOB_ENV, capture_output=True, text=True, check=True).stdout.strip()


# -- (1) a 2-rank job through submitit, and (2) the same job interrupted --
@pytest.fixture(scope="module")
def uninterrupted_run(toy_setup, tmp_path_factory):
    """The reference: the 2-rank job run straight through submitit_slurm (the launcher's output, the run dir)."""
    sweep_dir = tmp_path_factory.mktemp("uninterrupted")
    name = f"rcmtest-reference-{uuid.uuid4().hex[:6]}"
    process = start_sweep(REPO, name, [f"hydra.sweep.dir={sweep_dir}", *toy_overrides(toy_setup, MAX_ITERS, save_every=10)])
    try:
        output = finish(process, timeout=240)
    finally:
        subprocess.run(["scancel", "-n", name], capture_output=True)
    return output, sweep_dir


def test_two_rank_gloo_job_through_submitit_completes(uninterrupted_run):
    output, sweep_dir = uninterrupted_run
    final = sweep_dir / "0" / "checkpoints" / f"iter_{MAX_ITERS:09d}"
    assert is_complete(final) and len(rank_states(final)) == 2
    logs = task_logs(sweep_dir)
    assert "global_rank=1(2)" in logs  # submitit started two tasks; rcm.launch made them ranks 0 and 1
    assert f"finished {MAX_ITERS} iterations" in logs


def test_timeout_signal_requeues_and_resumes_to_the_same_parameters(uninterrupted_run, toy_setup, tmp_path, job_name):
    """USR2 mid-run (what Slurm sends signal_delay_s before the limit) -> checkpoint -> requeue -> resume:
    the end state equals the uninterrupted run's bit for bit. The sweep directory is Hydra's default
    (runs/multirun/<time>), so this also checks that the requeued job finds the same directory."""
    overrides = toy_overrides(toy_setup, MAX_ITERS, save_every=10)
    process = start_sweep(tmp_path, job_name, overrides)
    run_dir_glob = tmp_path / "runs" / "multirun" / "*" / "0"
    try:
        wait_until(lambda: heartbeat_iteration(run_dir_glob) >= 4, 180, "the job to reach iteration 4")
        (job_id,) = squeue_ids(job_name)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        finish(process, timeout=300)
    finally:
        process.kill()
    (run_dir,) = list((tmp_path / "runs" / "multirun").glob("*/0"))
    logs = task_logs(run_dir.parent)
    stopped = re.search(r"stopped on SIGUSR2 at iteration (\d+)", logs)
    assert stopped and 4 <= int(stopped.group(1)) < MAX_ITERS, logs[-3000:]
    assert f"requeued job {job_id}" in logs and f"resumed from {run_dir}/checkpoints/iter_{int(stopped.group(1)):09d}" in logs
    assert job_record(job_id)["Restarts"] == "1"

    _, reference_dir = uninterrupted_run
    reference_iteration, reference = final_state(reference_dir / "0", overrides)
    iteration, resumed = final_state(run_dir, overrides)
    assert iteration == reference_iteration == MAX_ITERS
    assert_same_state(reference, resumed)
    final = f"checkpoints/iter_{MAX_ITERS:09d}"
    assert same_value(rank_states(run_dir / final), rank_states(reference_dir / "0" / final))  # RNG, data position


# -- (3) a Hydra sweep --
def test_hydra_sweep_of_two_values_runs_both_jobs_in_their_own_directories(toy_setup, tmp_path, job_name):
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(REPO, job_name, [f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.gpus_per_node=1",
                                           *toy_overrides(toy_setup, 4, save_every=4), "optim.lr=1e-4,3e-4"])
    output = finish(process, timeout=240)
    assert "#0 : " in output and "#1 : " in output
    for job, lr in ((0, 1e-4), (1, 3e-4)):
        run_dir = sweep_dir / str(job)
        assert is_complete(run_dir / "checkpoints" / "iter_000000004"), f"job {job} did not finish"
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
        assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 4


# -- (4) scancel during a save --
def _start_saving_every_iteration(toy_setup, tmp_path, name) -> tuple[str, Path, Path]:
    """A 2-rank srun job (slurm/train_srun.sbatch) that saves a checkpoint after every iteration."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    job_id = sbatch("train_srun.sbatch", name, log, ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
                    [*toy_overrides(toy_setup, 1000, save_every=1), f"run_dir={run_dir}"])
    wait_until(lambda: heartbeat_iteration(run_dir) >= 3, 180, "the job to reach iteration 3")
    return job_id, run_dir, log


def _half_written(run_dir: Path) -> list[Path]:
    """Checkpoints being written: incomplete and newer than every complete one. An older incomplete one is being
    pruned (its marker goes first), which a SIGKILL test must not take for the save in flight."""
    found = sorted((run_dir / "checkpoints").glob("iter_*"))
    complete = [p for p in found if is_complete(p)]
    return [p for p in found if not is_complete(p) and (not complete or p.name > complete[-1].name)]


def test_scancel_during_a_save_leaves_a_loadable_checkpoint(toy_setup, tmp_path, job_name):
    """scancel sends SIGTERM: the save in progress completes, the ranks stop, nothing half-written is left,
    the job is not requeued (the user cancelled it), and the latest checkpoint loads."""
    job_id, run_dir, log = _start_saving_every_iteration(toy_setup, tmp_path, job_name)
    caught = wait_until(lambda: _half_written(run_dir), 60, "a checkpoint being written", interval=0.002)[0]
    subprocess.run(["scancel", job_id], check=True)
    record = wait_for_job_end(job_id, 60)
    text = log.read_text(errors="replace")
    assert "stopped on SIGTERM" in text and "is not requeued: it was cancelled" in text, text[-3000:]
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", record
    assert _half_written(run_dir) == []
    iteration, _ = final_state(run_dir, toy_overrides(toy_setup, 1000, save_every=1))
    assert iteration >= int(caught.name[5:])


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(toy_setup, tmp_path, job_name):
    """No chance to finish (both ranks SIGKILLed while a checkpoint is half written): that checkpoint has
    no COMPLETE marker, is skipped, and the one before it loads."""
    job_id, run_dir, _ = _start_saving_every_iteration(toy_setup, tmp_path, job_name)
    pids = [json.loads((run_dir / "heartbeats" / f"rank_{r:05d}.json").read_text())["pid"] for r in range(2)]
    caught = wait_until(lambda: _half_written(run_dir), 60, "a checkpoint being written", interval=0.001)[0]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    record = wait_for_job_end(job_id, 60)
    assert record["JobState"] == "FAILED", record
    assert not is_complete(caught)
    iteration, _ = final_state(run_dir, toy_overrides(toy_setup, 1000, save_every=1))
    assert iteration == int(caught.name[5:]) - 1


# -- a hung rank, and the torchrun template --
def test_hung_rank_fails_the_job_with_the_collective_timeout_and_names_the_rank(toy_setup, tmp_path, job_name):
    """Rank 1 stops dead (SIGSTOP): rank 0's collective times out, it logs the traceback and which rank was
    behind, exits 1, and srun --kill-on-bad-exit ends the job as FAILED instead of hanging to its time limit."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    job_id = sbatch("train_srun.sbatch", job_name, log, ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
                    [*toy_overrides(toy_setup, 1000, save_every=1000), f"run_dir={run_dir}",
                     "launch.collective_timeout_minutes=0.25", "launch.hang_timeout_minutes=2"])
    wait_until(lambda: heartbeat_iteration(run_dir, rank=1) >= 3, 180, "rank 1 to reach iteration 3")
    pid = json.loads((run_dir / "heartbeats" / "rank_00001.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    record = wait_for_job_end(job_id, 120)
    text = log.read_text(errors="replace")
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", record
    assert "Traceback (most recent call last)" in text
    named = r"rank 0 of 2 failed; ranks that froze or fell behind:\nrank 1 \(host \S+, pid %d\): silent for" % pid
    assert re.search(named, text), text[-3000:]


def test_torchrun_template_forwards_the_pre_timeout_signal_and_requeues(toy_setup, tmp_path, job_name):
    """slurm/train_torchrun.sbatch: HUP to torchrun -> forwarded to both workers -> checkpoint -> requeue -> resume."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    job_id = sbatch("train_torchrun.sbatch", job_name, log, ["--gpus-per-node=2", "--cpus-per-task=2"],
                    [*toy_overrides(toy_setup, MAX_ITERS, save_every=10), f"run_dir={run_dir}"])
    wait_until(lambda: heartbeat_iteration(run_dir) >= 4, 180, "the job to reach iteration 4")
    subprocess.run(["scancel", "--signal=HUP", job_id], check=True)
    record = wait_until(lambda: (r := job_record(job_id))["JobState"] == "COMPLETED" and r, 300,
                        "the requeued job to complete", interval=1)
    text = log.read_text(errors="replace")
    assert record["Restarts"] == "1"
    assert "stopped on SIGHUP" in text and f"requeued job {job_id}" in text and "resumed from" in text, text[-3000:]
    assert is_complete(run_dir / "checkpoints" / f"iter_{MAX_ITERS:09d}")


# -- a stop signal sent to the batch shell (issue 22, part 5) --
def test_term_to_the_batch_shell_reaches_the_ranks_which_checkpoint_and_requeue(uninterrupted_run, toy_setup, tmp_path,
                                                                               job_name):
    """`scancel --full --signal=TERM` signals the batch shell and srun as well as the ranks. srun turns its own TERM
    into SIGKILL of every task, and an untrapped shell dies at once: either would end the job before the ranks
    checkpoint. slurm/train_srun.sbatch traps the signal and keeps srun out of its reach, so the ranks stop on
    SIGTERM, save, requeue the (still running) job, and the requeued job resumes to the uninterrupted end state."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    overrides = toy_overrides(toy_setup, MAX_ITERS, save_every=10)
    job_id = sbatch("train_srun.sbatch", job_name, log, ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
                    [*overrides, f"run_dir={run_dir}"])
    wait_until(lambda: heartbeat_iteration(run_dir) >= 4, 180, "the job to reach iteration 4")
    subprocess.run(["scancel", "--full", "--signal=TERM", job_id], check=True)
    record = wait_until(lambda: (r := job_record(job_id))["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") and r,
                        300, "the requeued job to end", interval=1)
    text = log.read_text(errors="replace")
    stopped = re.search(r"stopped on SIGTERM at iteration (\d+)", text)
    assert stopped and 4 <= int(stopped.group(1)) < MAX_ITERS, text[-3000:]
    assert "batch shell: got SIGTERM; forwarding it" in text and "forcing job termination" not in text, text[-3000:]
    assert f"requeued job {job_id}" in text and f"resumed from {run_dir}/checkpoints/iter_{int(stopped.group(1)):09d}" in text
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    _, reference_dir = uninterrupted_run
    reference_iteration, reference = final_state(reference_dir / "0", overrides)
    iteration, resumed = final_state(run_dir, overrides)
    assert iteration == reference_iteration == MAX_ITERS
    assert_same_state(reference, resumed)
