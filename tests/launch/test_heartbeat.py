"""Per-rank heartbeat files name the ranks that fell behind; the watchdog ends a rank that stops iterating."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from rcm.launch.heartbeat import Heartbeat, describe_heartbeats, read_heartbeats


def test_heartbeat_file_is_kept_fresh_by_a_thread_between_iterations(tmp_path):
    """The file's `time` advances while the loop is busy elsewhere (e.g. waiting in a collective)."""
    heartbeat = Heartbeat(tmp_path, rank=3, every_s=0.5, hang_timeout_s=0)
    try:
        heartbeat.beat(7)
        first = read_heartbeats(tmp_path)[0]
        time.sleep(1.5)
        later = read_heartbeats(tmp_path)[0]
    finally:
        heartbeat.close()
    assert first["rank"] == 3 and first["iteration"] == later["iteration"] == 7 and first["pid"] > 0
    assert later["time"] > first["time"] and later["progress_time"] == first["progress_time"]


def test_description_names_frozen_ranks_and_ranks_behind(tmp_path):
    now = time.time()
    for rank, iteration, silent, idle in ((0, 50, 1, 20), (1, 47, 2, 30), (2, 50, 900, 900)):
        (tmp_path / f"rank_{rank:05d}.json").write_text(json.dumps(
            {"rank": rank, "iteration": iteration, "time": now - silent, "progress_time": now - idle,
             "host": "n1", "pid": 100 + rank}))
    text = describe_heartbeats(tmp_path, stale_after_s=60, now=now)
    assert "rank 0 " not in text  # waiting in a collective: its thread still writes
    assert "rank 1 (host n1, pid 101): at iteration 47 while others reached 50" in text
    assert "rank 2 (host n1, pid 102): silent for 900 s" in text
    assert describe_heartbeats(tmp_path / "none", 60) == ""


def _run(code: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    return result, time.time() - started


def test_watchdog_dumps_stacks_and_exits_a_rank_that_stops_iterating(tmp_path):
    """A rank stuck outside any collective (here: sleeping) exits 1 after hang_timeout_s, with its stack in the log."""
    result, elapsed = _run(f"""
        import time
        from rcm.launch.heartbeat import Heartbeat
        heartbeat = Heartbeat({str(tmp_path)!r}, rank=0, every_s=0, hang_timeout_s=1)
        heartbeat.beat(7)
        def stuck_in_data_loading():
            time.sleep(60)
        stuck_in_data_loading()
    """)
    assert result.returncode == 1, result.stderr
    assert "Timeout" in result.stderr and "stuck_in_data_loading" in result.stderr
    assert elapsed < 30


def test_closed_watchdog_stays_quiet(tmp_path):
    result, _ = _run(f"""
        import time
        from rcm.launch.heartbeat import Heartbeat
        heartbeat = Heartbeat({str(tmp_path)!r}, rank=0, every_s=0, hang_timeout_s=1)
        heartbeat.beat(1)
        heartbeat.close()
        time.sleep(2)
    """)
    assert result.returncode == 0, result.stderr


def test_description_names_the_rank_whose_node_address_the_error_names(tmp_path, monkeypatch):
    """A crashed node's rank still has a fresh heartbeat; gloo's "Connection closed by peer [address]" is what
    identifies it. Other ranks (and this rank's own host) are not blamed."""
    import socket

    now = time.time()
    for rank, host in ((0, "n1"), (1, "n2"), (2, "n3")):
        (tmp_path / f"rank_{rank:05d}.json").write_text(json.dumps(
            {"rank": rank, "iteration": 9, "time": now - 1, "progress_time": now - 1, "host": host, "pid": 100 + rank}))
    addresses = {"n1": "10.77.0.11", "n2": "10.77.0.12", "n3": "10.77.0.13"}
    monkeypatch.setattr(socket, "gethostname", lambda: "n1")
    monkeypatch.setattr(socket, "gethostbyname_ex", lambda host: (host, [], [addresses[host]]))
    error = RuntimeError("[pair.cc:553] Connection closed by peer [10.77.0.12]:35999. This is typically caused by ...")
    text = describe_heartbeats(tmp_path, stale_after_s=60, now=now, error=error)
    assert text == "rank 1 (host n2, pid 101): lost, this rank's error names its address 10.77.0.12 (its node or " \
                   "process is gone), last at iteration 9"
    assert describe_heartbeats(tmp_path, stale_after_s=60, now=now, error="timed out after 1800000 ms") == ""
    try:
        raise error
    except RuntimeError:  # without `error`, the exception being handled is read
        assert "rank 1 (host n2" in describe_heartbeats(tmp_path, stale_after_s=60, now=now)
