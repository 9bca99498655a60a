"""The launcher's environment (srun, submitit, torchrun) mapped to torch.distributed's variables."""
from __future__ import annotations

import os

import pytest

from rcm.launch.environment import (
    MASTER_PORT_BASE,
    MASTER_PORT_SPAN,
    apply_env_defaults,
    expand_hostlist,
    launcher_torch_env,
    local_rank,
    master_port_for_job,
    slurm_task_env,
)

SRUN_TASK = {  # task 5 of a 2-node x 4-task srun step
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NODEID": "1",
}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[001-003,010]", ["gpu001", "gpu002", "gpu003", "gpu010"]),
    ("a[1-2],b07,c[9-10]", ["a1", "a2", "b07", "c9", "c10"]),
    ("rack1-n[08-09]", ["rack1-n08", "rack1-n09"]),
])
def test_hostlist_expands_like_scontrol_show_hostnames(nodelist, hosts):
    """Ranges keep their zero padding, groups keep their order, dashes in names are not ranges."""
    assert expand_hostlist(nodelist) == hosts


def test_srun_task_maps_to_rank_local_rank_world_size_and_first_host():
    env = slurm_task_env(SRUN_TASK)
    assert env["RANK"] == "5" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "8"
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "gpu007"
    assert env["MASTER_PORT"] == str(master_port_for_job("123456"))


def test_master_port_is_per_job_and_below_the_ephemeral_range():
    ports = {master_port_for_job(job) for job in range(1000, 1100)}
    assert len(ports) == 100
    assert all(MASTER_PORT_BASE <= p < MASTER_PORT_BASE + MASTER_PORT_SPAN < 32768 for p in ports)
    assert master_port_for_job("4242_7") == master_port_for_job("4242_7")  # array ids too


def test_batch_script_and_torchrun_are_left_alone():
    """Outside a job step (the batch shell) nothing is mapped; torchrun's own RANK / WORLD_SIZE win."""
    batch_shell = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert launcher_torch_env(batch_shell) is None
    torchrun_worker = {**SRUN_TASK, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert launcher_torch_env(torchrun_worker) is None
    assert local_rank(torchrun_worker) == 3
    assert local_rank(SRUN_TASK) == 1
    assert local_rank({}) == 0


def test_submitit_task_agrees_with_submitit_helper(monkeypatch):
    """Under submitit the mapping is submitit's TorchDistributedEnvironment; it must match the srun mapping."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    via_submitit = launcher_torch_env()
    srun = slurm_task_env(SRUN_TASK)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        assert via_submitit[key] == srun[key], key
    assert via_submitit["MASTER_PORT"] == launcher_torch_env()["MASTER_PORT"]  # the same on every task


def test_env_defaults_never_override_the_user(monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    applied = apply_env_defaults({"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    assert applied == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert os.environ["NCCL_DEBUG"] == "INFO"


def test_srun_task_gets_its_node_rank_and_keeps_a_master_addr_set_by_the_user():
    """NODE_RANK is Slurm's node index of the task (torchrun calls it GROUP_RANK); an exported MASTER_ADDR wins
    over the first host, as an exported MASTER_PORT wins over the job-id port."""
    assert slurm_task_env(SRUN_TASK)["NODE_RANK"] == "1"
    assert slurm_task_env({**SRUN_TASK, "SLURM_NODEID": "0", "SLURM_PROCID": "0"})["NODE_RANK"] == "0"
    assert slurm_task_env({**SRUN_TASK, "MASTER_ADDR": "10.1.2.3"})["MASTER_ADDR"] == "10.1.2.3"


def test_a_multi_node_step_without_a_node_list_is_refused_in_one_sentence():
    """Falling back to 127.0.0.1 on several nodes would start one rendezvous per node that never completes."""
    from rcm.cli_errors import UserError

    no_list = {k: v for k, v in SRUN_TASK.items() if not k.endswith("NODELIST")}
    with pytest.raises(UserError, match=r"task 5 of a 2-node Slurm step has no SLURM_STEP_NODELIST .* set MASTER_ADDR"):
        slurm_task_env(no_list)
    one_node = {**no_list, "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NUM_NODES": "1"}
    assert slurm_task_env(one_node)["MASTER_ADDR"] == "127.0.0.1"  # one node: the local rendezvous is right


def test_a_job_array_task_is_named_by_array_and_task_id():
    """`scontrol requeue <array id>` would requeue every point of a sweep: a task is named ARRAY_TASK."""
    from rcm.launch.environment import slurm_job_reference

    assert slurm_job_reference({"SLURM_JOB_ID": "25", "SLURM_ARRAY_JOB_ID": "25", "SLURM_ARRAY_TASK_ID": "1"}) == "25_1"
    assert slurm_job_reference({"SLURM_JOB_ID": "26", "SLURM_ARRAY_JOB_ID": "25", "SLURM_ARRAY_TASK_ID": "0"}) == "25_0"
    assert slurm_job_reference({"SLURM_JOB_ID": "42"}) == "42"
    assert slurm_job_reference({}) is None


def test_local_world_size_follows_slurms_tasks_per_node_also_when_uneven():
    """`srun -N2 -n3` puts 2 tasks on the first node and 1 on the second (SLURM_STEP_TASKS_PER_NODE=2,1)."""
    from rcm.launch.environment import expand_tasks_per_node

    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1] and expand_tasks_per_node("4") == [4]
    uneven = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
    assert slurm_task_env({**uneven, "SLURM_NODEID": "0"})["LOCAL_WORLD_SIZE"] == "2"
    assert slurm_task_env({**uneven, "SLURM_NODEID": "1"})["LOCAL_WORLD_SIZE"] == "1"
    assert slurm_task_env({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})["LOCAL_WORLD_SIZE"] == "4"
