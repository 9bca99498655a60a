"""Where a training step's time goes: data, forward + backward, optimizer and checkpoint stall, and what the steps
of a window add up to (time per step, samples and tokens per second, MFU, CUDA memory).

On CUDA each phase ends with a device synchronization, so a phase's time is its own work and not the queue the
previous one left behind. A step already waits for its gradient norm (the non-finite check), so the one extra
synchronization per phase costs little: the host can no longer queue the next step's kernels behind the
optimizer's.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PHASES = ("data", "forward_backward", "optimizer", "checkpoint")
GIB = 2**30


@dataclass
class TimerTotals:
    """Running sums since the timer started: steps, each phase's seconds, wall seconds, and the FLOPs and wall
    seconds of the steps whose FLOP count is known."""

    steps: int = 0
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall_s: float = 0.0
    flops: float = 0.0
    flops_wall_s: float = 0.0

    def minus(self, earlier: "TimerTotals") -> "TimerTotals":
        """What was added since ``earlier``."""
        return TimerTotals(self.steps - earlier.steps, {k: v - earlier.phases[k] for k, v in self.phases.items()},
                           self.wall_s - earlier.wall_s, self.flops - earlier.flops, self.flops_wall_s - earlier.flops_wall_s)

    def copy(self) -> "TimerTotals":
        return self.minus(TimerTotals())


class StepTimer:
    """Times the phases of each step (``phase``) and the whole step (``end_step``), as running totals that each
    reader (the metrics log, the straggler check) takes differences of."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.synchronize = torch.device(device).type == "cuda"
        self.totals = TimerTotals()
        self.step_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        """Add the time of the block (with the device work it queued, on CUDA) to phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.totals.phases[name] += time.perf_counter() - start

    def end_step(self, flops: float | None = None) -> None:
        """A step ended (its checkpoint stall included); ``flops``: its model FLOPs over all ranks, if known."""
        now = time.perf_counter()
        wall = now - self.step_start
        self.step_start = now
        self.totals.steps += 1
        self.totals.wall_s += wall
        if flops is not None:
            self.totals.flops += flops
            self.totals.flops_wall_s += wall

    @contextmanager
    def excluded(self):
        """A block between steps (drawing samples) that counts in no step's time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.step_start += time.perf_counter() - start

    def snapshot(self) -> TimerTotals:
        """The running totals now (pass to ``window_metrics`` later for the steps in between)."""
        return self.totals.copy()


def window_metrics(window: TimerTotals, samples_per_step: int, tokens_per_sample: int,
                   peak_flops: float | None = None, world_size: int = 1) -> dict[str, float]:
    """Means per step of the ``window``'s steps: seconds per step and per phase, samples and tokens per second
    (all ranks), and MFU when the FLOPs of some steps and the device's peak are known."""
    if window.steps <= 0 or window.wall_s <= 0:
        return {}
    step_s = window.wall_s / window.steps
    metrics = {"time/step_s": step_s, **{f"time/{k}_s": v / window.steps for k, v in window.phases.items()}}
    metrics["throughput/samples_per_s"] = samples_per_step / step_s
    metrics["throughput/tokens_per_s"] = samples_per_step * tokens_per_sample / step_s
    if peak_flops and window.flops_wall_s > 0:
        metrics["throughput/mfu"] = window.flops / window.flops_wall_s / (peak_flops * world_size)
    return metrics


def cuda_memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak allocated (since the last call) and reserved CUDA memory of ``device`` in GiB; {} off CUDA."""
    if device.type != "cuda":
        return {}
    metrics = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
               "memory/reserved_gib": torch.cuda.memory_reserved(device) / GIB}
    torch.cuda.reset_peak_memory_stats(device)
    return metrics
