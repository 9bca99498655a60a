"""Stragglers: the ranks' per-phase times gathered in one all-gather name the rank that sleeps in its data phase
(two gloo ranks), in the main rank's warning, the logs and the heartbeats the hang report reads."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import torch

from rcm.launch.heartbeat import Heartbeat, describe_heartbeats
from rcm.observe.stragglers import COLUMNS, find_slow_ranks
from tests.forked import run_forked

SLEEP_S = 0.1


def test_the_rank_slower_than_factor_times_the_median_in_a_phase_is_named_by_its_worst_phase():
    places = [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)]
    times = [[1.0, 0.01, 0.9, 0.05, 0.0] for _ in places]
    times[2] = [1.0, 0.01, 0.5, 0.45, 0.0]  # its optimizer is slow; the others wait in forward + backward
    times[3] = [1.0, 0.012, 0.9, 0.05, 0.0]  # 1.2× the median data time: within the factor
    [slow] = find_slow_ranks(times, places, factor=1.5)
    assert (slow.rank, slow.host, slow.local_rank, slow.phase) == (2, "n2", 0, "optimizer")
    assert slow.describe() == "rank 2 (host n2, local rank 0): optimizer 0.450 s per step against a median of 0.050 s"
    assert find_slow_ranks([[0.001] * len(COLUMNS), [0.005] * len(COLUMNS)], places[:2], 1.5) == []  # noise
    # Forward + backward holds the wait for the slowest rank, so a rank long there is not named.
    assert find_slow_ranks([[1.0, 0.01, 0.9, 0.05, 0.0], [1.0, 0.01, 0.1, 0.05, 0.0]], places[:2], 1.5) == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _rank(rank: int, init_file: str, heartbeats: str, results) -> None:
    import torch.distributed as dist

    from rcm.parallel.distributed import DistributedInfo
    from rcm.training.monitor import TrainingMonitor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    records = _Records()
    logging.getLogger("rcm.train").addHandler(records)
    cfg = SimpleNamespace(logging=SimpleNamespace(telemetry_every=0, straggler_every=4, straggler_factor=1.5),
                          train=SimpleNamespace(batch_size=1, mixed_precision="none"),
                          data=SimpleNamespace(latent_shape=[2, 1, 4, 4]), model=SimpleNamespace(patch_size=[1, 2, 2]))
    state = SimpleNamespace(cfg=cfg, info=DistributedInfo(rank, 2, rank), device=torch.device("cpu"), mesh=None,
                            distiller=SimpleNamespace(method="flow_matching"), optimizers={})
    heartbeat = Heartbeat(heartbeats, rank, every_s=60, hang_timeout_s=0)
    try:
        monitor = TrainingMonitor(state, heartbeat)
        logs = {}
        for iteration in range(1, 5):
            with monitor.timer.phase("data"):
                if rank == 1:  # a slow file system on rank 1's node
                    time.sleep(SLEEP_S)
            with monitor.timer.phase("forward_backward"):
                dist.all_reduce(torch.ones(1))  # the gradient sync: rank 0 waits here for rank 1
            monitor.end_step("student")
            logs = monitor.observe(iteration, log_due=False)
            heartbeat.beat(iteration)
        heartbeat.write()
        results.put((rank, logs, records.messages))
    finally:
        heartbeat.close()
        dist.destroy_process_group()


def test_a_rank_sleeping_in_its_data_phase_is_named_by_host_and_local_rank(tmp_path):
    results = dict((rank, (logs, messages)) for rank, logs, messages in run_forked(
        _rank, [(rank, str(tmp_path / "init"), str(tmp_path / "heartbeats")) for rank in range(2)]))
    for rank in range(2):
        logs, _ = results[rank]
        assert logs["stragglers/slow_ranks"] == 1
        # Both ranks' steps take the slow rank's time: the data phase, not the step, names the culprit.
        assert SLEEP_S <= logs["stragglers/step_s_min"] <= logs["stragglers/step_s_max"] < 3 * SLEEP_S
    [warning] = results[0][1]
    assert warning.startswith("iteration 4: 1 of 2 ranks are slow: rank 1 (host ") and ", local rank 1): data 0.1" in warning
    assert results[1][1] == []  # only the main rank warns
    report = describe_heartbeats(tmp_path / "heartbeats", stale_after_s=60)
    assert "rank 1 (host" in report and "slow at the last straggler check, data 0.1" in report and "rank 0" not in report
