"""After a stop checkpoint: requeue the job, so it starts again and resumes from that checkpoint.

- Slurm (plain sbatch, or submitit's Slurm executor): rank 0 runs ``scontrol requeue $SLURM_JOB_ID``.
  The job goes back to PENDING with the same id, script and run directory; Slurm counts the restarts
  in SLURM_RESTART_COUNT, which ``launch.max_requeues`` caps. On SIGTERM the job's record decides:
  ``scancel`` (COMPLETING without a time-limit reason) is the user's wish to stop, and a job that
  Slurm requeues itself (``scontrol requeue``, PreemptMode=REQUEUE: PENDING / REQUEUED, or COMPLETING with
  its restart count already raised) needs nothing; both are left alone.
- submitit's local executor: exit status 144 is its "requeue me" code (it restarts the tasks).
- Anywhere else (a workstation, torchrun by hand): nothing to requeue; run the same command again.

Every rank then exits with status 128 + signal number (so a requeued segment never looks like a
finished run, and submitit does not mistake it for a result).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess

import torch.distributed as dist

from rcm.launch.environment import slurm_job_reference

log = logging.getLogger("rcm.launch")
SUBMITIT_LOCAL_REQUEUE_EXIT_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE


def request_slurm_requeue(job_id: str, restarts: int, max_requeues: int) -> bool:
    """Ask Slurm to requeue ``job_id`` unless it was requeued ``max_requeues`` times already; True if it will."""
    if restarts >= max_requeues:
        log.error("job %s is not requeued: it was requeued %d times already (launch.max_requeues=%d); "
                  "resubmit it to continue from the checkpoint", job_id, restarts, max_requeues)
        return False
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.error("`scontrol requeue %s` failed (%s); resubmit the job to continue from the checkpoint", job_id, detail)
        return False
    log.info("requeued job %s (restart %d of at most %d)", job_id, restarts + 1, max_requeues)
    return True


def slurm_job_record(job_id: str) -> dict[str, str]:
    """The fields of ``scontrol show job`` (JobState, Reason, Restarts, ...); {} if it cannot tell."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=True, capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def reason_not_to_requeue_on_sigterm(job_id: str, restarts: int = 0) -> str | None:
    """Why a job that got SIGTERM must not be requeued by us, as the rest of a sentence about the job ('is requeued
    by Slurm itself ...', 'is not requeued: it was cancelled ...'); None if we should requeue it.

    ``restarts`` is this segment's SLURM_RESTART_COUNT. A job that Slurm requeues (``scontrol requeue``,
    PreemptMode=REQUEUE) shows COMPLETING while its steps are killed, exactly as a cancelled one does; only its
    restart count tells them apart: Slurm has already raised it above this segment's.
    """
    record = slurm_job_record(job_id)
    state, reason = record.get("JobState", ""), record.get("Reason", "")
    if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return f"is requeued by Slurm itself (state {state})"
    if record.get("Restarts", "").isdigit() and int(record["Restarts"]) > restarts:
        return f"is requeued by Slurm itself (state {state}, restart {record['Restarts']})"
    if state in ("COMPLETING", "CANCELLED") and reason != "TimeLimit":
        return f"is not requeued: it was cancelled (state {state}, reason {reason})"
    return None


def stop_and_requeue(signum: int, info, requeue: bool, max_requeues: int) -> None:
    """Called on every rank after the stop checkpoint is complete; requeues (rank 0) and exits. Never returns."""
    exit_code = 128 + signum
    name = signal.Signals(signum).name
    job_id = slurm_job_reference(os.environ)  # an array task by ARRAY_TASK: the array's id would requeue every task
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        if requeue:
            exit_code = SUBMITIT_LOCAL_REQUEUE_EXIT_CODE
        if info.is_main:
            log.info("stopped on %s; %s", name, "asking submitit to restart the job" if requeue else "not requeued (launch.requeue=false)")
    elif job_id and info.is_main:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        why_not = reason_not_to_requeue_on_sigterm(job_id, restarts) if signum == signal.SIGTERM else None
        if not requeue:
            log.info("stopped on %s; not requeued (launch.requeue=false)", name)
        elif why_not:
            log.info("stopped on %s; job %s %s", name, job_id, why_not)
        else:
            request_slurm_requeue(job_id, restarts, max_requeues)
    elif info.is_main:
        log.info("stopped on %s after saving a checkpoint; run the same command again to resume", name)
    # Nobody exits (and makes srun kill the step) before rank 0 has requeued. (A plain barrier: this launch module
    # sits below rcm.parallel, whose DistributedInfo ``info`` is; only its rank, world size and is_main are read.)
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
    raise SystemExit(exit_code)
