"""Stragglers: every few iterations one small all-gather of each rank's mean step and phase times; the spread is
logged and a rank slower than ``factor`` × the median in some phase is named by host and local rank.

In synchronous data-parallel training every rank's *step* takes as long as the slowest one's (the others wait
in the gradient collectives), so the step time alone cannot name the culprit, and forward + backward (and a
checkpoint save) hold that wait: the fast ranks look slow there. Only the phases that are a rank's own work,
``OWN_WORK_PHASES``, name it: data loading (a slow file system or CPU) and the optimizer step on local shards
(a slow or throttled GPU).
"""
from __future__ import annotations

import logging
import socket
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rcm.observe.step_timing import PHASES, TimerTotals

log = logging.getLogger("rcm.observe")
COLUMNS = ("step", *PHASES)
OWN_WORK_PHASES = ("data", "optimizer")  # no collective inside: a rank's time there is its own
# A phase this few seconds over the median is noise, whatever the ratio (a 1 ms data phase against 0.3 ms).
MIN_EXCESS_S = 0.01


@dataclass(frozen=True)
class SlowRank:
    """A rank whose ``phase`` took ``seconds`` per step against the ranks' median ``median_s``."""

    rank: int
    host: str
    local_rank: int
    phase: str
    seconds: float
    median_s: float

    def describe(self) -> str:
        return (f"rank {self.rank} (host {self.host}, local rank {self.local_rank}): {self.phase} "
                f"{self.seconds:.3f} s per step against a median of {self.median_s:.3f} s")


def mean_times(window: TimerTotals) -> list[float]:
    """Seconds per step of the window: the whole step, then each phase (in ``COLUMNS`` order)."""
    steps = max(window.steps, 1)
    return [window.wall_s / steps, *(window.phases[phase] / steps for phase in PHASES)]


def find_slow_ranks(times: list[list[float]], places: list[tuple[str, int]], factor: float) -> list[SlowRank]:
    """The ranks (rows of ``times``, in ``COLUMNS`` order) slower than ``factor`` × the median in one of the
    ``OWN_WORK_PHASES``, one entry per rank (its worst phase); ``places``: each rank's (host, local rank)."""
    slow: dict[int, SlowRank] = {}
    for phase in OWN_WORK_PHASES:
        values = [row[COLUMNS.index(phase)] for row in times]
        # The lower median: with two ranks it is the faster one, so the slower can be named at all.
        median = statistics.median_low(values)
        for rank, value in enumerate(values):
            excess = value - median
            if value > factor * median and excess > MIN_EXCESS_S:
                if rank not in slow or excess > slow[rank].seconds - slow[rank].median_s:
                    slow[rank] = SlowRank(rank, *places[rank], phase, value, median)
    return [slow[rank] for rank in sorted(slow)]


class StragglerWatch:
    """The per-rank step times of every rank, gathered on demand (a collective: every rank calls ``check`` at the
    same iteration). Constructing it is a collective too (each rank's host and local rank)."""

    def __init__(self, world_size: int, local_rank: int, factor: float, device: torch.device | str = "cpu"):
        self.world_size, self.factor, self.device = world_size, factor, torch.device(device)
        place = (socket.gethostname(), local_rank)
        self.places: list[tuple[str, int]] = [place] * world_size
        if world_size > 1:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, place)
            self.places = [tuple(p) for p in gathered]

    def check(self, window: TimerTotals) -> tuple[dict[str, float], list[SlowRank]]:
        """Gather every rank's times of its ``window``; returns the spread of step times as logs and the slow ranks."""
        mine = torch.tensor(mean_times(window), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            rows = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(rows, mine)
            times = [row.tolist() for row in rows]
        else:
            times = [mine.tolist()]
        step = [row[0] for row in times]
        logs = {"stragglers/step_s_min": min(step), "stragglers/step_s_median": statistics.median(step),
                "stragglers/step_s_max": max(step)}
        slow = find_slow_ranks(times, self.places, self.factor)
        logs["stragglers/slow_ranks"] = float(len(slow))
        return logs, slow
