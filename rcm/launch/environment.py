"""Who am I in the job: the launcher's environment (torchrun, srun, submitit) mapped to torch.distributed's.

torch.distributed's ``env://`` set-up reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (and LOCAL_RANK).
torchrun sets them itself; a task started by ``srun`` (one task per GPU) or by submitit only has the
launcher's own variables, which are translated here:

    SLURM_PROCID -> RANK    SLURM_LOCALID -> LOCAL_RANK    SLURM_STEP_NUM_TASKS -> WORLD_SIZE
    SLURM_NODEID -> NODE_RANK (torchrun's GROUP_RANK)     SLURM_JOB_ID -> MASTER_PORT
    first host of SLURM_STEP_NODELIST -> MASTER_ADDR

Under submitit (Slurm or local executor) submitit's TorchDistributedEnvironment gives the same mapping.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

from rcm.cli_errors import UserError

# Ports below Linux's ephemeral range (32768-60999), so the rendezvous port never collides with an
# outgoing connection's; two jobs sharing a node get different ports unless their ids differ by 15000.
MASTER_PORT_BASE = 15000
MASTER_PORT_SPAN = 15000
_HOST_GROUP = re.compile(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)")


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[001-003,007],login1') as host names, in order."""
    hosts: list[str] = []
    position = 0
    while position < len(nodelist):
        match = _HOST_GROUP.match(nodelist, position)
        if not match or match.end() == position:
            raise ValueError(f"cannot parse the Slurm node list '{nodelist}' at position {position}")
        prefix, ranges = match.group(1), match.group(2)
        position = match.end()
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)  # zero padding: node[001-010] -> node001 ... node010
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{width}d}")
    return hosts


def master_port_for_job(job_id: str | int) -> int:
    """A rendezvous port derived from the job id, so every task of a job picks the same one."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return MASTER_PORT_BASE + int(digits) % MASTER_PORT_SPAN


def expand_tasks_per_node(counts: str) -> list[int]:
    """Slurm's per-node task counts ('2(x3),1') as one number per node ([2, 2, 2, 1])."""
    per_node: list[int] = []
    for group in counts.split(","):
        count, _, repeat = group.partition("(x")
        per_node += [int(count)] * int(repeat.rstrip(")") or 1)
    return per_node


def tasks_on_node(environ: Mapping[str, str], world_size: int, nodes: int) -> int:
    """How many tasks of the step run on this task's node; an even split when Slurm does not say."""
    counts = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = int(environ.get("SLURM_NODEID", "0"))
    if counts:
        per_node = expand_tasks_per_node(counts)
        if node < len(per_node):
            return per_node[node]  # uneven steps (-n3 on 2 nodes: 2,1) differ from node to node
    return max(1, world_size // max(1, nodes))


def slurm_job_reference(environ: Mapping[str, str]) -> str | None:
    """The id naming this job alone to scontrol and scancel; None outside Slurm.

    A job array task's SLURM_JOB_ID may equal the array's id, which names every task of the array
    (`scontrol requeue 25` requeues all of a sweep's points), so a task is named ARRAYID_TASKID.
    """
    array_id, task_id = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return environ.get("SLURM_JOB_ID") or None


def slurm_task_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """torch.distributed variables for a task started by ``srun`` (None outside a job step)."""
    if "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        return None  # the batch script itself, or salloc's shell: not one task of a parallel step
    world_size = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))
    nodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_JOB_NUM_NODES", "1")))
    nodelist = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", ""))
    if not nodelist and nodes > 1:
        # 127.0.0.1 would give every node its own rendezvous, each waiting for the others' ranks forever.
        raise UserError(f"task {environ['SLURM_PROCID']} of a {nodes}-node Slurm step has no SLURM_STEP_NODELIST "
                         "or SLURM_JOB_NODELIST to take the rendezvous address from; set MASTER_ADDR to the first node")
    return {
        "MASTER_ADDR": environ.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT", str(master_port_for_job(environ.get("SLURM_JOB_ID", "0")))),
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(environ, world_size, nodes)),
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
    }


def submitit_task_env() -> dict[str, str]:
    """torch.distributed variables for a task started by submitit (its own helper, Slurm or local)."""
    from submitit.helpers import TorchDistributedEnvironment

    task = TorchDistributedEnvironment()
    return {
        "MASTER_ADDR": task.master_addr,
        "MASTER_PORT": str(task.master_port),
        "RANK": str(task.rank),
        "WORLD_SIZE": str(task.world_size),
        "LOCAL_RANK": str(task.local_rank),
        "LOCAL_WORLD_SIZE": str(task.local_world_size),
    }


def launcher_torch_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The torch.distributed variables this process should have; None if already set (torchrun) or single process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return None  # torchrun, or a user who set them by hand: theirs win
    if environ.get("SUBMITIT_EXECUTOR"):
        return submitit_task_env()
    return slurm_task_env(environ)


def export_launcher_torch_env() -> bool:
    """Put the launcher's rank / world size / rendezvous into os.environ for ``env://``; True if it did."""
    mapped = launcher_torch_env()
    if mapped is None:
        return False
    os.environ.update(mapped)
    return True


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's index on its node (which GPU it drives), whichever launcher started it."""
    environ = os.environ if environ is None else environ
    if "LOCAL_RANK" in environ:
        return int(environ["LOCAL_RANK"])
    mapped = launcher_torch_env(environ)
    return int(mapped["LOCAL_RANK"]) if mapped else 0


def apply_env_defaults(defaults: Mapping[str, str]) -> dict[str, str]:
    """Set each variable that the user has not set (NCCL settings); returns the ones it set."""
    applied = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = str(value)
            applied[key] = str(value)
    return applied
