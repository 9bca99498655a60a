"""Per-rank liveness: a heartbeat file each rank keeps fresh, and a watchdog for a rank that stops iterating.

Each rank's file (``<run_dir>/heartbeats/rank_NNNNN.json``) holds its last iteration and two times:
``progress_time`` (the last finished iteration) and ``time`` (rewritten by a background thread every
``every_s`` seconds). A rank waiting in a collective keeps ``time`` fresh (the wait releases the GIL);
a frozen one (stopped, swapped out, deadlocked holding the GIL, on a dead node) does not. So when a
collective times out, the failing rank can name the culprit: ``describe_heartbeats``.

A rank stuck outside any collective (a file system read that never returns) is ended by its own
watchdog: ``faulthandler`` runs it on a C thread, so it fires even if Python is blocked; it dumps
every thread's stack to stderr (the job's log) and exits the process with status 1.
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

from rcm.atomic_files import atomic_write_bytes

MIN_WRITE_INTERVAL_S = 0.5


class Heartbeat:
    """Keeps ``<directory>/rank_NNNNN.json`` fresh from a thread and arms the hang watchdog on every beat."""

    def __init__(self, directory: str | Path, rank: int, every_s: float, hang_timeout_s: float):
        self.directory = Path(directory)
        self.rank = rank
        self.every_s = max(every_s, MIN_WRITE_INTERVAL_S)
        self.hang_timeout_s = hang_timeout_s
        self.path = self.directory / f"rank_{rank:05d}.json"
        self.iteration: int | None = None
        self.progress_time = time.time()
        self.fields: dict = {}  # what rcm.observe adds: this rank's GPU readings, its step times, slow ranks
        self._armed = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def beat(self, iteration: int) -> None:
        """An iteration finished: re-arm the watchdog; the first beat starts the writer thread."""
        self.iteration, self.progress_time = iteration, time.time()
        if self.hang_timeout_s > 0:
            # Re-arming replaces the pending timer; the stacks go to stderr, i.e. the job's log.
            faulthandler.dump_traceback_later(self.hang_timeout_s, exit=True, file=sys.stderr)
            self._armed = True
        if self._thread is None:
            self.write()
            self._thread = threading.Thread(target=self._keep_writing, name=f"heartbeat-rank{self.rank}", daemon=True)
            self._thread.start()

    def report(self, **fields) -> None:
        """Add ``fields`` (JSON values) to every record from now on; ``slow``: this rank's slow phase at the last
        straggler check as {"phase", "seconds", "median_s"}, or None."""
        self.fields.update(fields)

    def write(self) -> None:
        """Rewrite the heartbeat file now."""
        record = {**self.fields, "rank": self.rank, "iteration": self.iteration, "progress_time": self.progress_time,
                  "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                  "job_id": os.environ.get("SLURM_JOB_ID")}
        atomic_write_bytes(self.path, json.dumps(record).encode())

    def _keep_writing(self) -> None:
        while not self._stopped.wait(self.every_s):
            try:
                self.write()
            except OSError:
                pass  # a full or unmounted file system must not kill training; the next write may work

    def close(self) -> None:
        """Stop the writer and disarm the watchdog (training ended, or it is about to exit on purpose)."""
        self._stopped.set()
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed = False


def read_heartbeats(directory: str | Path) -> list[dict]:
    """Every rank's last heartbeat record, by rank."""
    records = []
    for path in sorted(Path(directory).glob("rank_*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a file replaced while we read it: the next report has it
    return records


def describe_heartbeats(directory: str | Path, stale_after_s: float, now: float | None = None,
                        error: BaseException | str | None = None) -> str:
    """One line per rank that went silent for ``stale_after_s`` (frozen), is behind the others, or whose host
    ``error`` names (default: the exception being handled); '' if none."""
    records = [r for r in read_heartbeats(directory) if r.get("iteration") is not None]
    if not records:
        return ""
    now = time.time() if now is None else now
    newest = max(r["iteration"] for r in records)
    error_text = str(sys.exc_info()[1] if error is None else error)
    named = _hosts_named_in(error_text, {r["host"] for r in records})
    lines = []
    for r in records:
        where = f"rank {r['rank']} (host {r['host']}, pid {r['pid']})"
        silent_s, idle_s = now - r["time"], now - r["progress_time"]
        if silent_s > stale_after_s:
            lines.append(f"{where}: silent for {silent_s:.0f} s (frozen or gone), last at iteration {r['iteration']}")
        elif r["host"] in named:
            # A crashed node's rank still looks fresh (its last beat is seconds old), but the peer that closed the
            # connection is in the error as an address: the node or the process behind it is gone.
            lines.append(f"{where}: lost, this rank's error names its address {named[r['host']]} "
                         f"(its node or process is gone), last at iteration {r['iteration']}")
        elif r["iteration"] < newest:
            lines.append(f"{where}: at iteration {r['iteration']} while others reached {newest}, "
                         f"no progress for {idle_s:.0f} s")
        elif r.get("slow"):  # named by the last straggler check (rcm/observe/stragglers.py)
            slow = r["slow"]
            lines.append(f"{where}: slow at the last straggler check, {slow['phase']} {slow['seconds']:.3f} s per step "
                         f"against a median of {slow['median_s']:.3f} s")
    return "\n".join(lines)


_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")


def _hosts_named_in(text: str, hosts: set[str]) -> dict[str, str]:
    """{host: address} for each host whose IPv4 address appears in ``text`` (gloo and NCCL name the peer so)."""
    addresses = set(_IPV4.findall(text))
    if not addresses:
        return {}
    named = {}
    for host in hosts:
        if host == socket.gethostname():
            continue  # this rank's own host: every address in its errors could be its own end
        try:
            host_addresses = set(socket.gethostbyname_ex(host)[2])
        except OSError:
            continue
        if host_addresses & addresses:
            named[host] = sorted(host_addresses & addresses)[0]
    return named
