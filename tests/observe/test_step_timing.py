"""Step timing: each phase gets its own time, the step its wall time; MFU only where FLOPs and a peak are known."""
from __future__ import annotations

import time

import pytest

from rcm.observe.step_timing import StepTimer, TimerTotals, cuda_memory_metrics, window_metrics


def test_phases_and_steps_are_timed_and_a_window_averages_its_steps():
    timer = StepTimer("cpu")
    before = timer.snapshot()
    for _ in range(2):
        with timer.phase("data"):
            time.sleep(0.03)
        with timer.phase("optimizer"):
            time.sleep(0.01)
        timer.end_step(flops=1e9)
    metrics = window_metrics(timer.snapshot().minus(before), samples_per_step=4, tokens_per_sample=10,
                             peak_flops=1e12, world_size=2)
    assert 0.03 <= metrics["time/data_s"] < 0.06 and 0.01 <= metrics["time/optimizer_s"] < 0.03
    assert metrics["time/forward_backward_s"] == metrics["time/checkpoint_s"] == 0
    assert metrics["time/step_s"] >= metrics["time/data_s"] + metrics["time/optimizer_s"]
    assert metrics["throughput/samples_per_s"] == pytest.approx(4 / metrics["time/step_s"])
    assert metrics["throughput/tokens_per_s"] == pytest.approx(40 / metrics["time/step_s"])
    assert metrics["throughput/mfu"] == pytest.approx(1e9 / metrics["time/step_s"] / 2e12)


def test_mfu_is_left_out_without_a_peak_or_without_counted_steps():
    counted = TimerTotals(steps=2, wall_s=1.0, flops=1e12, flops_wall_s=1.0)
    uncounted = TimerTotals(steps=2, wall_s=1.0)
    assert "throughput/mfu" not in window_metrics(counted, 1, 1, peak_flops=None)
    assert "throughput/mfu" not in window_metrics(uncounted, 1, 1, peak_flops=1e15)
    assert window_metrics(TimerTotals(), 1, 1) == {}
    assert cuda_memory_metrics(__import__("torch").device("cpu")) == {}
