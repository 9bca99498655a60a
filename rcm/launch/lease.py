"""One writer per run directory: ``<run_dir>/LEASE`` names the process that trains in it.

The lease is a small JSON file (host, pid, Slurm job / step / array ids, start time, heartbeat time and a random
token) that the main rank creates at start, rewrites from a thread every ``launch.heartbeat_every_s`` seconds
and deletes on exit. A second run on the same directory (a stray old job beside its requeued copy, a typo in
``run_dir``) finds a live lease and refuses to start, naming the holder. A lease is taken over, with a warning,
when its holder is gone: its process is dead (same host), its heartbeat is older than
``launch.lease_timeout_minutes``, or it belongs to this very Slurm job (a requeue restarts the job under its id).

Shared file systems (NFS, Lustre, GPFS) do not all honour ``flock``, so the lease relies only on operations that
are atomic there: a new lease appears by ``link`` (create-exclusive: it fails if the name exists) of a complete
temporary file, a takeover by ``rename`` over the old one, and the new holder re-reads the file after a short
pause to confirm that its own token is the one on disk (of two processes taking over at once, the later rename
wins and the other sees it and refuses). The refreshing thread checks the token before every rewrite, so a
holder that was taken over (it froze for longer than the timeout) notices and stops instead of writing on.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist

from rcm.cli_errors import UserError, one_line
from rcm.launch.heartbeat import MIN_WRITE_INTERVAL_S

log = logging.getLogger("rcm.launch")
LEASE_NAME = "LEASE"
SETTLE_S = 1.0  # pause between a takeover and the re-read that confirms it (longer than a read-then-rename)
ATTEMPTS = 5


class LeaseHeld(UserError):
    """Another live process holds the run directory's lease."""


def _process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _process_alive(pid: int, start_time: str | None) -> bool:
    """Whether process ``pid`` of this host still runs (and is the same process, where its start time is known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    current = _process_start_time(pid)
    return start_time is None or current is None or current == start_time


def this_process() -> dict[str, Any]:
    """Who this process is, as a lease records it: host, pid, Slurm job / step / array ids."""
    env = os.environ
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start_time(os.getpid()),
        "job_id": env.get("SLURM_JOB_ID"), "step_id": env.get("SLURM_STEP_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"), "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
    }


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    """'host H, pid P, Slurm job J, last heartbeat N s ago' for a lease record."""
    now = time.time() if now is None else now
    job = record.get("job_id")
    if job and record.get("array_job_id"):
        job = f"{job} (array {record['array_job_id']}_{record.get('array_task_id')})"
    age = now - float(record.get("heartbeat", 0))
    return (f"host {record.get('host')}, pid {record.get('pid')}, "
            f"{f'Slurm job {job}' if job else 'no Slurm job'}, last heartbeat {age:.0f} s ago")


class RunLease:
    """The lease of one run directory, held by this process once ``acquire`` returns."""

    def __init__(self, run_dir: str | Path, timeout_s: float, refresh_every_s: float, settle_s: float = SETTLE_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_NAME
        self.timeout_s = timeout_s
        self.refresh_every_s = max(refresh_every_s, MIN_WRITE_INTERVAL_S)  # the heartbeat files' pace
        self.settle_s = settle_s
        self.record = {**this_process(), "token": uuid.uuid4().hex, "started": time.time(), "heartbeat": time.time()}
        self.held = False
        self.lost = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file --
    def read(self) -> dict[str, Any] | None:
        """The lease on disk; None if there is none, {} if it cannot be parsed."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _write_temporary(self) -> Path:
        """Our record, complete and flushed, in a temporary file beside the lease (unique to this writer)."""
        self.record["heartbeat"] = time.time()
        temporary = self.run_dir / f".{LEASE_NAME}.{self.record['token']}.{threading.get_ident()}.tmp"
        with open(temporary, "w") as file:
            file.write(json.dumps(self.record))
            file.flush()
            os.fsync(file.fileno())
        return temporary

    def _create_exclusive(self) -> bool:
        """Make the lease ours if none exists (True); False if one does."""
        temporary = self._write_temporary()
        try:
            os.link(temporary, self.path)  # atomic and exclusive, NFS included
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create instead
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as file:
                file.write(temporary.read_text())
                file.flush()
                os.fsync(file.fileno())
            return True
        finally:
            temporary.unlink(missing_ok=True)

    def _replace(self) -> None:
        """Put our record over whatever lease is there (a takeover, or a heartbeat)."""
        os.replace(self._write_temporary(), self.path)

    def _ours(self) -> bool:
        record = self.read()
        return bool(record) and record.get("token") == self.record["token"]

    # -- taking it --
    def _takeover_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lease of ``holder`` may be taken (its holder is gone or is us), or None if it is live."""
        me = self.record
        same_host = holder.get("host") == me["host"]
        if same_host and holder.get("pid") == me["pid"] and holder.get("pid_start") == me["pid_start"]:
            return ""  # this process already held it (train() called again): nothing to warn about
        if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
            return f"Slurm job {me['job_id']} was requeued"
        if same_host and isinstance(holder.get("pid"), int) and not _process_alive(holder["pid"], holder.get("pid_start")):
            return f"its process {holder['pid']} on {holder['host']} is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.timeout_s:
            return f"its heartbeat is {age:.0f} s old, more than launch.lease_timeout_minutes allows ({self.timeout_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Hold the lease or raise LeaseHeld naming its live holder; a stale lease is taken over with a warning."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(ATTEMPTS):
            if self._create_exclusive():
                if self._ours():
                    return self._held()
                continue
            holder = self.read()
            if holder is None:  # released between our attempt and the read
                continue
            if not holder:  # unreadable: half-written by a file system without links, or damaged
                age = time.time() - self._mtime()
                if age <= self.timeout_s:
                    time.sleep(self.settle_s)
                    continue
                reason = f"it is unreadable and {age:.0f} s old"
            else:
                reason = self._takeover_reason(holder)
                if reason is None:
                    raise LeaseHeld(f"run directory {self.run_dir} is in use by another run ({describe_holder(holder)}): "
                                    f"stop that run, or choose another run_dir; its lease {self.path} is taken over "
                                    f"once its heartbeat is {self.timeout_s:.0f} s old (launch.lease_timeout_minutes)")
            self._replace()
            time.sleep(self.settle_s)  # another process taking over at once renames after us: its lease then stays
            if self._ours():
                if reason:
                    log.warning("took over the lease of run directory %s from %s: %s", self.run_dir,
                                describe_holder(holder) if holder else "an unreadable lease", reason)
                return self._held()
        holder = self.read() or {}
        raise LeaseHeld(f"run directory {self.run_dir} could not be leased: its lease {self.path} kept changing hands "
                        f"(last holder: {describe_holder(holder) if holder else 'none readable'}); "
                        "another run is starting on it, so choose another run_dir or stop that run")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return time.time()

    def _held(self) -> None:
        self.held = True
        self._thread = threading.Thread(target=self._keep_refreshing, name="run-lease", daemon=True)
        self._thread.start()

    # -- keeping it --
    def refresh(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours; otherwise mark it lost. Returns whether we hold it."""
        if not self.held:
            return False
        if not self._ours():
            self.held, self.lost = False, True
            holder = self.read()
            log.error("lost the lease of run directory %s to %s; this run must stop", self.run_dir,
                      describe_holder(holder) if holder else "nobody (it was deleted)")
            return False
        self._replace()
        return True

    def _keep_refreshing(self) -> None:
        while not self._stopped.wait(self.refresh_every_s):
            try:
                if not self.refresh():
                    return
            except OSError:
                pass  # a file system hiccup: the next refresh may work, and the timeout is many refreshes long

    def release(self) -> None:
        """Stop refreshing and delete the lease if it is still ours."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self.held and self._ours():
            self.path.unlink(missing_ok=True)
        self.held = False


def lease_run_directory(run_dir: str | Path, is_main: bool, world_size: int, timeout_s: float,
                        refresh_every_s: float) -> RunLease | None:
    """Collective start: the main rank takes the run directory's lease; every rank raises LeaseHeld (one sentence)
    if it could not, so all of them exit. Returns the lease on the main rank, None elsewhere."""
    lease, error = None, None
    if is_main:
        try:
            lease = RunLease(run_dir, timeout_s, refresh_every_s)
            lease.acquire()
        except Exception as failure:  # noqa: BLE001 - every rank must hear of any failure, not only a held lease
            error = str(failure) if isinstance(failure, UserError) else f"cannot lease run directory {run_dir}: {one_line(failure)}"
    if world_size > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise LeaseHeld(error)
    return lease
