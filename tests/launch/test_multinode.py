"""Multi-node tests on a real multi-node Slurm: `slurm/local_cluster.sh up --nodes 3` (one slurmd per network
namespace, nodes n1..n3, tasks on different nodes talk over TCP only).

- the Slurm -> torch.distributed mapping on a 2-node and a 3-node job;
- dp_shard x cp = 2 x 2 over 2 nodes x 2 tasks (CP inside a node, FSDP across): one rCM step equals one
  process, and the toy rCM training through slurm/train_srun.sbatch -N 2 and slurm/train_torchrun.sbatch
  (one torchrun per node) ends in the same parameters;
- drills: the pre-timeout signal on 2 nodes -> checkpoint -> requeue -> bit-identical resume; a node dies
  mid-step -> the survivor leaves naming the lost rank, nothing half-written counts, and a resume on the one
  remaining node reshards the latest complete checkpoint and finishes.

Every job is a tiny CPU run (gloo); the whole module takes a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import torch

from rcm.checkpoint.manager import is_complete
from tests.launch.test_slurm import _half_written, wait_until
from tests.launch.toy_run import assert_same_state, final_state, rank_states, same_value, toy_overrides

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
MULTINODE_CONF = Path(os.environ.get("RCM_MULTINODE_DIR", "/var/lib/rcm-multinode")) / "etc" / "slurm.conf"
USABLE = ("idle", "mixed", "allocated", "completing")


def multinode_unavailable_reason(nodes: int = 3) -> str | None:
    """Why the multi-node tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the multi-node cluster needs root (network namespaces); run as root"
    if shutil.which("sinfo") is None:
        return "no Slurm here; start one with slurm/local_cluster.sh up --nodes 3"
    if not MULTINODE_CONF.is_file():
        return f"no multi-node cluster ({MULTINODE_CONF} is absent); start one with slurm/local_cluster.sh up --nodes 3"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15,
                                env={**os.environ, "SLURM_CONF": str(MULTINODE_CONF)}).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the multi-node controller does not answer ({error}); slurm/local_cluster.sh up --nodes 3"
    usable = [line.split()[0] for line in states if line.strip() and line.split()[1].rstrip("*~#") in USABLE]
    if len(usable) < nodes:
        return (f"the multi-node cluster has {len(usable)} usable nodes, these tests need {nodes}; "
                "slurm/local_cluster.sh up --nodes 3")
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(reason := multinode_unavailable_reason()),
                                                   reason=reason or "")]

JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RCM_PYTHON": sys.executable, "SLURM_CONF": str(MULTINODE_CONF),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
MAX_ITERS = 16
TWO_BY_TWO = ["parallel.dp_shard=2", "parallel.cp=2"]


# -- helpers --
def slurm(*command: str, check: bool = True) -> str:
    """A Slurm client command against the multi-node cluster; its stdout."""
    return subprocess.run(command, capture_output=True, text=True, env=JOB_ENV, check=check, timeout=60).stdout


def job_record(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict."""
    out = slurm("scontrol", "show", "job", "-o", job_id)
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for_state(job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
    """The job's record once its state is one of ``states``."""
    return wait_until(lambda: (r := job_record(job_id))["JobState"] in states and r, timeout,
                      f"job {job_id} to reach {'/'.join(states)}", interval=0.5)


def heartbeat(run_dir: Path, rank: int = 0) -> dict:
    """The newest heartbeat record of ``rank`` ({} if none yet)."""
    try:
        return json.loads((run_dir / "heartbeats" / f"rank_{rank:05d}.json").read_text())
    except (OSError, ValueError):
        return {}


def sbatch(script: str, name: str, log: Path, options: list[str], overrides: list[str]) -> str:
    """Submit one of the repository's sbatch templates to the multi-node cluster; the job id."""
    command = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log}", "--open-mode=append", "--time=10",
               "--gpus-per-node=2", *options, str(REPO / "slurm" / script), *overrides]
    return subprocess.run(command, cwd=REPO, env=JOB_ENV, capture_output=True, text=True, check=True).stdout.strip()


def srun_tasks(nodes: int, tasks: int, *command: str, timeout: float = 300) -> None:
    """Run ``command`` as ``tasks`` tasks of one srun step on ``nodes`` nodes (Slurm fills the first nodes first);
    fail with its output if a task fails."""
    result = subprocess.run(["srun", f"--nodes={nodes}", f"--ntasks={tasks}", "--cpus-per-task=1",
                             "--time=5", *command],
                            cwd=REPO, env=JOB_ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def cluster(*arguments: str) -> None:
    """slurm/local_cluster.sh on the multi-node cluster (node-kill K, node-start K, ...)."""
    subprocess.run([str(CLUSTER_SCRIPT), *arguments], check=True, capture_output=True, timeout=60)


def network_weights(run_dir: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """Student, fake score and EMA weights of the run's latest checkpoint, loaded (resharded) into this one process."""
    _, state = final_state(run_dir, [o for o in overrides if not o.startswith("parallel.")])
    return {k: v for k, v in state.items() if not k.startswith("optim_")}


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Same names, every tensor within rtol (with an absolute floor at rtol of its largest entry)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=rtol * float(a[name].abs().max()) + 1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def job_name(request):
    """A unique job name; whatever still runs under it is cancelled when the test ends."""
    name = f"rcmmn-{request.node.name[:20]}-{uuid.uuid4().hex[:6]}"
    yield name
    subprocess.run(["scancel", "-n", name], capture_output=True, env=JOB_ENV)


# -- (1) the Slurm -> torch.distributed mapping --
@pytest.mark.parametrize("tasks_per_node", [[2, 2], [1, 1, 1], [2, 1]], ids=["2x2", "3x1", "2+1"])
def test_slurm_variables_map_to_torch_distributed_on_several_nodes(tasks_per_node, tmp_path):
    """srun on 2 and 3 nodes (also unevenly, -N2 -n3): every task gets MASTER_ADDR = the first node, its node rank,
    local rank, its node's task count and the world size, and the gloo group they form over TCP between the
    namespaces all-reduces and all-gathers correctly."""
    world = sum(tasks_per_node)
    srun_tasks(len(tasks_per_node), world, sys.executable, "-m", "tests.launch.multinode_worker", "mapping",
               str(tmp_path))
    records = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(world)]
    layout = [(node, local) for node, count in enumerate(tasks_per_node) for local in range(count)]  # block order
    hosts = [f"n{node + 1}" for node, _ in layout]
    for rank, (record, (node, local)) in enumerate(zip(records, layout)):
        assert record["host"] == hosts[rank], record
        assert record["MASTER_ADDR"] == "n1" and record["RANK"] == record["slurm_procid"] == str(rank)
        assert record["WORLD_SIZE"] == str(world) and record["LOCAL_WORLD_SIZE"] == str(tasks_per_node[node])
        assert record["LOCAL_RANK"] == str(local) and record["NODE_RANK"] == str(node)
        assert record["group_rank"] == rank and record["group_size"] == world
        assert record["all_reduce"] == world * (world + 1) / 2 and record["hosts"] == hosts
    assert len({r["MASTER_PORT"] for r in records}) == 1


def test_more_nodes_than_the_cluster_holds_is_refused_at_submission(toy_setup, tmp_path):
    """sbatch --nodes=4 on the 3-node cluster: Slurm refuses it in one line, before anything runs."""
    result = subprocess.run(["sbatch", "--parsable", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=1",
                             "--gpus-per-node=2",
                             f"--output={tmp_path / 'job.out'}", str(REPO / "slurm" / "train_srun.sbatch"),
                             *toy_overrides(toy_setup, 4, save_every=4), f"run_dir={tmp_path / 'run'}"],
                            cwd=REPO, env=JOB_ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "sbatch: error: Batch job submission failed: Node count specification invalid"], result.stderr
    assert not (tmp_path / "run").exists()


# -- (2) dp_shard x cp = 2 x 2 on 2 nodes x 2 tasks --
def test_two_by_two_mesh_across_two_nodes_matches_one_process(tmp_path):
    """One rCM step (student and critic) under dp_shard x cp = 2 x 2, CP inside each node and FSDP across the two:
    every rank's losses and the whole gradients equal the single-process reference (rtol 1e-5)."""
    from tests.launch.multinode_worker import PARALLEL_SCENARIOS
    from tests.parallel.workers import run_reference

    srun_tasks(2, 4, sys.executable, "-m", "tests.launch.multinode_worker", "parallel", str(tmp_path))
    for name, spec in PARALLEL_SCENARIOS.items():
        reference = run_reference(spec)
        for rank in range(4):
            result = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            hosts = result["hosts"]
            assert hosts[rank] == hosts[rank ^ 1] and hosts[rank] != hosts[rank ^ 2], hosts  # CP pair on one node
            expected = reference["per_rank"][result["dp_rank"]]
            torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected["losses"]),
                                       rtol=1e-5, atol=0)
            for parameter, grad in reference["grads"].items():
                torch.testing.assert_close(result["grads"][parameter], grad, rtol=1e-5,
                                           atol=1e-5 * float(grad.abs().max()),
                                           msg=lambda m: f"{name} {parameter}: {m}")


@pytest.fixture(scope="module")
def two_by_two_srun_run(toy_setup, tmp_path_factory):
    """The toy rCM run with dp_shard x cp = 2 x 2 through slurm/train_srun.sbatch -N 2 (2 tasks per node)."""
    root = tmp_path_factory.mktemp("srun2x2")
    overrides = [*toy_overrides(toy_setup, 4, save_every=4), *TWO_BY_TWO, "train.async_save=false"]
    name = f"rcmmn-srun2x2-{uuid.uuid4().hex[:6]}"
    job_id = sbatch("train_srun.sbatch", name, root / "job.out",
                    ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
                    [*overrides, f"run_dir={root / 'run'}"])
    try:
        record = wait_for_state(job_id, ("COMPLETED", "FAILED", "CANCELLED"), 300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, env=JOB_ENV)
    assert record["JobState"] == "COMPLETED", (root / "job.out").read_text()[-3000:]
    return root, overrides


def test_two_by_two_training_through_srun_on_two_nodes(two_by_two_srun_run):
    """4 ranks on n1 and n2 train the toy rCM run to the end; each node's two ranks are one CP group."""
    root, _ = two_by_two_srun_run
    final = root / "run" / "checkpoints" / "iter_000000004"
    assert is_complete(final) and len(rank_states(final)) == 4
    text = (root / "job.out").read_text()
    assert "4 ranks on n[1-2]" in text and "finished 4 iterations" in text


def test_one_torchrun_per_node_trains_the_same_parameters_as_srun(two_by_two_srun_run, toy_setup, tmp_path, job_name):
    """slurm/train_torchrun.sbatch -N 2 (rendezvous on n1, 2 workers per node) ends where the srun job ended."""
    srun_root, overrides = two_by_two_srun_run
    log = tmp_path / "job.out"
    job_id = sbatch("train_torchrun.sbatch", job_name, log, ["--nodes=2", "--cpus-per-task=2"],
                    [*overrides, f"run_dir={tmp_path / 'run'}"])
    record = wait_for_state(job_id, ("COMPLETED", "FAILED", "CANCELLED"), 300)
    text = log.read_text(errors="replace")
    assert record["JobState"] == "COMPLETED", text[-3000:]
    assert "2 x 2 ranks, rendezvous n1:" in text
    assert_close_weights(network_weights(srun_root / "run", overrides), network_weights(tmp_path / "run", overrides))


# -- (3) drills on 2 nodes (1 rank per node), each compared with an uninterrupted run --
DRILL_ITERS = 30


def drill_overrides(toy_setup: Path) -> list[str]:
    """The 2-rank toy run of the drills: a checkpoint after every iteration, all of them kept."""
    return [*toy_overrides(toy_setup, DRILL_ITERS, save_every=1), "train.keep_last=1000"]


def submit_drill(name: str, root: Path, toy_setup: Path, nodes: str = "--nodes=2") -> str:
    """slurm/train_srun.sbatch with one rank per node; its log is root/job.out, its run directory root/run."""
    return sbatch("train_srun.sbatch", name, root / "job.out", [nodes, "--ntasks-per-node=1", "--cpus-per-task=1"],
                  [*drill_overrides(toy_setup), f"run_dir={root / 'run'}"])


@pytest.fixture(scope="module")
def uninterrupted_two_node_run(toy_setup, tmp_path_factory) -> Path:
    """The drills' reference: the same 2-node job run straight through; its run directory."""
    root = tmp_path_factory.mktemp("uninterrupted2n")
    name = f"rcmmn-reference-{uuid.uuid4().hex[:6]}"
    job_id = submit_drill(name, root, toy_setup)
    try:
        record = wait_for_state(job_id, ("COMPLETED", "FAILED", "CANCELLED"), 300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, env=JOB_ENV)
    assert record["JobState"] == "COMPLETED", (root / "job.out").read_text()[-3000:]
    return root / "run"


def test_pre_timeout_signal_on_two_nodes_checkpoints_requeues_and_resumes_bit_identical(
        uninterrupted_two_node_run, toy_setup, tmp_path, job_name):
    """USR2 (Slurm's pre-timeout signal) sent to the batch shell alone (`scancel --batch`, what `--signal=B:USR2@T`
    does): the template forwards it to the step, i.e. to the ranks on n1 and n2 as `--signal=USR2@T` would. Both stop
    after the same iteration, both write the checkpoint, rank 0 requeues, and the requeued 2-node job resumes to
    the uninterrupted end state bit for bit."""
    job_id = submit_drill(job_name, tmp_path, toy_setup)
    wait_until(lambda: heartbeat(tmp_path / "run").get("iteration", -1) >= 4, 180, "the job to reach iteration 4")
    signalled_at = time.time()
    slurm("scancel", "--batch", "--signal=USR2", job_id)
    record = wait_for_state(job_id, ("COMPLETED", "FAILED", "CANCELLED"), 300)
    text = (tmp_path / "job.out").read_text(errors="replace")
    stopped = re.search(r"stopped on SIGUSR2 at iteration (\d+)", text)
    for event in ("requeued job", "resumed from"):
        logged = re.search(r"\[([\d-]+ [\d:]+),(\d+)\]\[[\w.]+\]\[INFO\] - " + event, text)
        if logged:
            at = datetime.strptime(logged.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(logged.group(2)) / 1000
            print(f"USR2 on 2 nodes: '{event}' {at - signalled_at:.1f} s after the signal")
    assert f"batch shell: got SIGUSR2; forwarding it to the steps of job {job_id}" in text, text[-3000:]
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", text[-3000:]
    assert stopped and 4 <= int(stopped.group(1)) < DRILL_ITERS, text[-3000:]
    assert len(rank_states(tmp_path / "run" / "checkpoints" / f"iter_{int(stopped.group(1)):09d}")) == 2
    assert f"requeued job {job_id}" in text and "resumed from" in text
    overrides = drill_overrides(toy_setup)
    reference_iteration, reference = final_state(uninterrupted_two_node_run, overrides)
    iteration, resumed = final_state(tmp_path / "run", overrides)
    assert iteration == reference_iteration == DRILL_ITERS
    assert_same_state(reference, resumed)
    final = f"checkpoints/iter_{DRILL_ITERS:09d}"
    assert same_value(rank_states(tmp_path / "run" / final), rank_states(uninterrupted_two_node_run / final))


@pytest.fixture
def restore_node_2():
    """Node n2 is started again (and usable) after a drill that killed it."""
    yield
    cluster("node-start", "2")
    wait_until(lambda: "n2 idle" in slurm("sinfo", "-h", "-N", "-o", "%N %T", check=False), 60, "n2 to be idle again")


def test_node_loss_ends_the_job_naming_the_lost_node_and_the_resume_on_one_node_finishes(
        uninterrupted_two_node_run, toy_setup, tmp_path, job_name, restore_node_2):
    """Node n2 crashes mid-run (its slurmd and rank SIGKILLed): rank 0 on n1 fails at its next collective, the job
    does not hang, and no half-written checkpoint is taken for complete. A fresh submission on the one remaining
    node resumes the latest complete checkpoint (written by 2 ranks) with 1 rank and finishes; its end state equals
    the uninterrupted 2-rank run continued on 1 rank from the same iteration."""
    run_dir = tmp_path / "run"
    job_id = submit_drill(job_name, tmp_path, toy_setup)
    wait_until(lambda: heartbeat(run_dir).get("iteration", -1) >= 6, 180, "the job to reach iteration 6")
    lost = heartbeat(run_dir, rank=1)
    assert lost.get("host") == "n2", lost
    killed_at = time.time()
    cluster("node-kill", "2")
    # Slurm requeues a batch job whose node failed (--requeue): it leaves RUNNING once n2 is declared DOWN.
    record = wait_until(lambda: (r := job_record(job_id))["JobState"] != "RUNNING" and r, 120,
                        "the job to stop running")
    ended_after = time.time() - killed_at
    slurm("scancel", job_id, check=False)  # the requeued job would wait for n2; resume on n1 instead
    text = (tmp_path / "job.out").read_text(errors="replace")
    named = rf"rank 0 of 2 failed; ranks that froze or fell behind:\nrank 1 \(host n2, pid {lost['pid']}\): lost, " \
            r"this rank's error names its address 10\.77\.0\.12"
    assert re.search(named, text), text[-3000:]
    failed = re.search(r"\[([\d-]+ [\d:]+),(\d+)\]\[rcm\.train\]\[ERROR\] - rank 0 of 2 failed", text)
    failed_at = datetime.strptime(failed.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(failed.group(2)) / 1000
    detected_after = failed_at - killed_at
    assert detected_after < 10, detected_after  # the survivor's next collective fails at once, long before the timeout
    assert ended_after < 60, ended_after  # Slurm declares n2 DOWN (SlurmdTimeout=10) and requeues the job
    checkpoints = sorted((run_dir / "checkpoints").glob("iter_*"))
    complete = [p for p in checkpoints if is_complete(p)]
    assert complete, checkpoints
    latest = int(complete[-1].name[5:])
    print(f"node loss: rank 0 failed {detected_after:.1f} s after the crash, the job left RUNNING {ended_after:.1f} s "
          f"after it ({record['JobState']}, reason {record.get('Reason')}); latest complete checkpoint {latest}")

    resume_log = tmp_path / "resume.out"
    resumed_id = sbatch("train_srun.sbatch", job_name, resume_log, ["--nodes=1", "--nodelist=n1", "--ntasks-per-node=1",
                                                                    "--cpus-per-task=1"],
                        [*drill_overrides(toy_setup), f"run_dir={run_dir}"])
    record = wait_for_state(resumed_id, ("COMPLETED", "FAILED", "CANCELLED"), 300)
    text = resume_log.read_text(errors="replace")
    assert record["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {run_dir}/checkpoints/iter_{latest:09d}" in text, text[-3000:]

    # The uninterrupted sequence: the reference's 2-rank checkpoint at that iteration, continued on 1 rank here.
    overrides = drill_overrides(toy_setup)
    continued = tmp_path / "continued"
    shutil.copytree(uninterrupted_two_node_run / "checkpoints" / f"iter_{latest:09d}",
                    continued / "checkpoints" / f"iter_{latest:09d}")
    result = subprocess.run([sys.executable, "-m", "rcm.train", *overrides, f"run_dir={continued}"], cwd=REPO,
                            env={k: v for k, v in JOB_ENV.items() if k != "SLURM_CONF"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference_iteration, reference = final_state(continued, overrides)
    iteration, resumed = final_state(run_dir, overrides)
    assert iteration == reference_iteration == DRILL_ITERS
    assert_same_state(reference, resumed)


# -- (4) the submitit/Hydra launcher preset on several nodes --
SUBMITIT_SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


def start_sweep(name: str, overrides: list[str]) -> subprocess.Popen:
    """`python -m rcm.train -m` on the submitit_slurm preset with 2 nodes per job; it waits for the results."""
    command = [sys.executable, "-m", "rcm.train", "-m", *SUBMITIT_SLURM, f"hydra.launcher.name={name}", *overrides]
    return subprocess.Popen(command, cwd=REPO, env=JOB_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def communicate(process: subprocess.Popen, timeout: float) -> str:
    """The launcher's output once it returned (killed, with a failure, after ``timeout`` s)."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the launcher did not return within {timeout} s:\n{process.communicate()[0][-3000:]}")


def test_submitit_preset_runs_two_nodes_by_two_tasks_to_the_srun_parameters(two_by_two_srun_run, tmp_path, job_name):
    """hydra/launcher=submitit_slurm with nodes=2, tasks_per_node=2 (one per placeholder GPU): 4 ranks, dp_shard x cp =
    2 x 2, the same end state as the srun template's job."""
    srun_root, overrides = two_by_two_srun_run
    process = start_sweep(job_name, [f"hydra.sweep.dir={tmp_path}", "hydra.launcher.gpus_per_node=2", *overrides])
    output = communicate(process, 300)
    assert process.returncode == 0, output[-3000:]
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(".submitit/*/*_log.*")))
    assert "global_rank=3(4)" in logs and "finished 4 iterations" in logs, logs[-3000:]
    assert_close_weights(network_weights(srun_root / "run", overrides), network_weights(tmp_path / "0", overrides))


def test_sweep_of_two_node_jobs_one_cancelled_the_other_completes(toy_setup, tmp_path, job_name):
    """-m over two learning rates: each point is a 2-node job in its own directory; scancel of one leaves the other
    to finish. (Without slurmdbd there is no sacct, so submitit cannot learn that a job was cancelled and the
    launcher would wait for its result forever; the test stops the launcher once the other point finished.)"""
    overrides = [*toy_overrides(toy_setup, 12, save_every=12), "optim.lr=1e-4,3e-4"]
    process = start_sweep(job_name, [f"hydra.sweep.dir={tmp_path}", "hydra.launcher.gpus_per_node=1", *overrides])
    final = tmp_path / "0" / "checkpoints" / "iter_000000012"
    try:
        jobs = wait_until(lambda: len(ids := slurm("squeue", "-h", "-n", job_name, "-t", "R", "-o", "%i").split()) == 2
                          and sorted(ids), 180, "both points of the sweep to run")
        records = {job: job_record(job) for job in jobs}
        wait_until(lambda: all((tmp_path / point / "config.yaml").is_file() for point in "01"), 120,
                   "both points to start training in their directories")
        slurm("scancel", jobs[1])
        wait_until(lambda: is_complete(final), 240, "the other point to finish", interval=0.5)
    finally:
        process.kill()
        process.communicate()
    assert all(record["NumNodes"] == "2" for record in records.values()), records
    assert wait_for_state(jobs[1], ("CANCELLED",), 30)
    assert wait_for_state(jobs[0], ("COMPLETED",), 60)
    assert "lr: 0.0001" in (tmp_path / "0" / "config.yaml").read_text()
    assert "lr: 0.0003" in (tmp_path / "1" / "config.yaml").read_text()
    assert not (tmp_path / "1" / "checkpoints" / "iter_000000012").exists()


def test_sigkill_of_one_nodes_rank_during_an_async_save_leaves_the_previous_checkpoint(toy_setup, tmp_path, job_name):
    """The rank on n2 is SIGKILLed while an asynchronous save is half written: that checkpoint never gets its
    marker (rank 0 alone cannot complete it), the job fails instead of hanging, and the one before it loads."""
    run_dir = tmp_path / "run"
    job_id = submit_drill(job_name, tmp_path, toy_setup)
    wait_until(lambda: heartbeat(run_dir, rank=1).get("iteration", -1) >= 3, 180, "rank 1 to reach iteration 3")
    pid = heartbeat(run_dir, rank=1)["pid"]
    caught = wait_until(lambda: _half_written(run_dir), 60, "a checkpoint being written", interval=0.001)[0]
    os.kill(pid, signal.SIGKILL)
    record = wait_for_state(job_id, ("FAILED", "COMPLETED", "CANCELLED"), 120)
    assert record["JobState"] == "FAILED", record
    assert not is_complete(caught)
    iteration, _ = final_state(run_dir, drill_overrides(toy_setup))
    assert iteration == int(caught.name[5:]) - 1


def test_a_frozen_rank_on_another_node_is_named_by_the_survivor(toy_setup, tmp_path, job_name):
    """The rank on n2 stops dead (SIGSTOP: a straggler taken to the extreme): rank 0's collective times out after
    launch.collective_timeout_minutes, it names rank 1 on n2 as silent, and the job ends FAILED instead of hanging."""
    run_dir = tmp_path / "run"
    job_id = sbatch("train_srun.sbatch", job_name, tmp_path / "job.out",
                    ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
                    [*toy_overrides(toy_setup, 1000, save_every=1000), f"run_dir={run_dir}",
                     "launch.collective_timeout_minutes=0.25", "launch.hang_timeout_minutes=2"])
    wait_until(lambda: heartbeat(run_dir, rank=1).get("iteration", -1) >= 3, 180, "rank 1 to reach iteration 3")
    pid = heartbeat(run_dir, rank=1)["pid"]
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        record = wait_for_state(job_id, ("FAILED", "COMPLETED", "CANCELLED"), 120)
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGCONT)  # a stopped process cannot act on anything else it is sent
    ended_after = time.time() - stopped_at
    text = (tmp_path / "job.out").read_text(errors="replace")
    assert record["JobState"] == "FAILED", record
    named = r"rank 0 of 2 failed; ranks that froze or fell behind:\nrank 1 \(host n2, pid %d\): silent for" % pid
    assert re.search(named, text), text[-3000:]
    print(f"frozen rank on n2: job FAILED {ended_after:.1f} s after SIGSTOP (collective timeout 15 s)")
    assert ended_after < 60
