"""The non-finite budget: a run whose updates keep being skipped on NaN or infinite values stops, naming the data.

An update counts as skipped when its gradient norm was not finite (the step leaves the optimizer alone), or when
every sample of the batch, over all ranks, had non-finite loss terms (the distillation losses zero such samples,
so the gradient stays finite but carries nothing). More than ``train.max_skipped_updates`` skipped updates among
the last ``train.skipped_updates_window`` iterations end the run on every rank with one sentence naming the shards
of the batches involved: poisoned data must not train to "success".
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rcm.cli_errors import UserError

MAX_NAMED = 5  # shards or samples named in one message; the rest are counted


class NonFiniteBudgetExceeded(UserError):
    """Too many updates were skipped on non-finite values."""


@dataclass
class StepOutcome:
    """What one rank's iteration says about non-finite values (besides its logs)."""

    logs: dict
    update_skipped: bool = False  # the gradient norm was not finite: no optimizer step
    nonfinite_samples: int = 0  # samples whose loss terms were non-finite (zeroed by the loss guards)
    samples: int = 0  # samples of this rank's batch
    shards: list[str] = field(default_factory=list)  # the shard of each sample of the batch
    bad_inputs: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, field) of non-finite input


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


class NonFiniteBudget:
    """Counts skipped updates in a sliding window of iterations, agreed over the ranks; raises when over budget."""

    def __init__(self, max_skipped: int, window: int, world_size: int = 1, device: torch.device | str = "cpu"):
        self.max_skipped, self.window = max_skipped, window
        self.world_size, self.device = world_size, torch.device(device)
        self.skipped: deque[tuple[int, list[str], list[tuple[str, str, str]]]] = deque()  # (iteration, shards, bad inputs)

    def record(self, iteration: int, outcome: StepOutcome) -> bool:
        """Account the iteration that ended at ``iteration`` (a collective when there are several ranks); returns
        whether its update counts as skipped, and raises NonFiniteBudgetExceeded on every rank when over budget."""
        counts = torch.tensor([float(outcome.update_skipped), outcome.nonfinite_samples, outcome.samples],
                              dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(counts)
        update_skipped, nonfinite, samples = counts.tolist()
        skipped = update_skipped > 0 or (samples > 0 and nonfinite >= samples)
        if skipped:
            # The shards to blame: those of samples with non-finite input if any, else every shard of the batch.
            blamed = sorted({shard for shard, _, _ in outcome.bad_inputs} or set(outcome.shards))
            self.skipped.append((iteration, blamed, list(outcome.bad_inputs)))
        while self.skipped and self.skipped[0][0] <= iteration - self.window:
            self.skipped.popleft()
        if len(self.skipped) > self.max_skipped:
            raise NonFiniteBudgetExceeded(self._explanation(iteration))
        return skipped

    def _explanation(self, iteration: int) -> str:
        """The sentence that ends the run, with the shards and bad samples of every rank."""
        shards = {shard for _, blamed, _ in self.skipped for shard in blamed}
        bad_inputs = {bad for _, _, inputs in self.skipped for bad in inputs}
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, (sorted(shards), sorted(bad_inputs)))
            shards = {shard for rank_shards, _ in gathered for shard in rank_shards}
            bad_inputs = {bad for _, rank_inputs in gathered for bad in rank_inputs}
        sentence = (f"{len(self.skipped)} of the last {min(self.window, iteration + 1)} iterations (up to iteration "
                    f"{iteration}) skipped their update on non-finite values, more than train.max_skipped_updates="
                    f"{self.max_skipped} per train.skipped_updates_window={self.window} allows")
        if not bad_inputs:
            return (f"{sentence}; their batches came from shard(s) {_named(sorted(shards))} and held finite values, so "
                    "the values went non-finite inside the networks or losses (try a lower learning rate)")
        by_shard: dict[str, list[str]] = {}
        for shard, key, name in sorted(bad_inputs):
            by_shard.setdefault(shard, []).append(f"{key} ({name})")
        return f"{sentence}; NaN or infinite input in shard " + _named(
            [f"{shard} (samples {_named(samples)})" for shard, samples in by_shard.items()])
