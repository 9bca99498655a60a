"""One training iteration (a batch, the scheduled network's loss, backward, gradient sync, update) and the
learning-rate schedule it follows."""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch.distributed.tensor import DTensor

from rcm.data.shards import nonfinite_samples
from rcm.distill.distiller import STUDENT
from rcm.observe.step_timing import StepTimer
from rcm.parallel.gradient_accumulation import backward_micro_batches, split_micro_batches
from rcm.training.nonfinite import StepOutcome
from rcm.training.state import TrainingState

log = logging.getLogger("rcm.train")


def lr_factor(iteration: int, warmup_iters: int, max_iters: int, decay: str = "none", min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based): a linear warmup over ``warmup_iters``, then
    ``decay`` (none, linear or cosine) from 1 down to ``min_ratio`` at the last iteration, ``max_iters`` − 1.

    A function of the iteration alone, so a resumed run continues the same schedule.
    """
    if warmup_iters > 0 and iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if decay == "none":
        return 1.0
    span = max_iters - 1 - warmup_iters
    progress = min(1.0, (iteration - warmup_iters) / span) if span > 0 else 1.0
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown learning-rate decay {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def set_learning_rate(state: TrainingState, role: str) -> None:
    """Set the optimizer of ``role`` to its base learning rate times the schedule at the current iteration."""
    optim = state.cfg.optim
    factor = lr_factor(state.iteration, optim.warmup_iters, state.cfg.train.max_iters, optim.decay, optim.min_lr_ratio)
    for group in state.optimizers[role].param_groups:
        group["lr"] = state.base_lr[role] * factor


def autocast(state: TrainingState):
    """bf16 autocast on CUDA with ``train.mixed_precision=bf16``; no-op otherwise."""
    if state.device.type == "cuda" and state.cfg.train.mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(state: TrainingState, timer: StepTimer | None = None) -> StepOutcome:
    """One iteration: a batch, the scheduled network's loss, backward, gradient sync, update; ``timer`` times its
    phases (data, forward_backward, optimizer)."""
    phase = timer.phase if timer is not None else lambda name: contextlib.nullcontext()
    with phase("data"):
        batch = next(state.loader)
        bad_inputs = nonfinite_samples(batch)  # on the host, before the copy: names the sample, not a tensor row
        if bad_inputs:
            _warn_nonfinite_input(state.iteration, bad_inputs)
        batch = {k: v.to(state.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    role = STUDENT if state.distiller.method == "flow_matching" else state.distiller.kind(state.iteration)
    network, optimizer = state.networks()[role], state.optimizers[role]
    set_learning_rate(state, role)

    def micro_batch_loss(micro_batch):
        with autocast(state):
            return state.distiller.loss(micro_batch, state.iteration)

    with phase("forward_backward"):
        optimizer.zero_grad(set_to_none=True)
        micro_batches = split_micro_batches(batch, state.cfg.parallel.grad_accumulation)
        results = backward_micro_batches(network, micro_batches, micro_batch_loss)
        result = results[-1]
        max_norm = state.cfg.optim.grad_clip if state.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        update_skipped = not torch.isfinite(grad_norm)
    with phase("optimizer"):
        if update_skipped:  # a NaN that the loss guards could not stop (e.g. inside the network): skip, don't poison Adam
            log.warning("iteration %d: non-finite %s gradient norm, update skipped", state.iteration, role)
        else:
            optimizer.step()
        if role == STUDENT:
            state.ema.update(state.student, state.student_iteration)
            state.student_iteration += 1
    state.iteration += 1
    # A sample is non-finite if any of its loss terms was (the loss guards count them as "<term>/nonfinite").
    nonfinite = sum(max((v for k, v in r.logs.items() if k.endswith("/nonfinite")), default=0) for r in results)
    return StepOutcome(logs={"role": role, f"grad_norm/{role}": float(grad_norm), **result.logs},
                       update_skipped=update_skipped, nonfinite_samples=int(nonfinite),
                       samples=len(batch["key"]), shards=list(batch["shard"]), bad_inputs=bad_inputs)


def _warn_nonfinite_input(iteration: int, bad_inputs: list[tuple[str, str, str]]) -> None:
    """One warning naming the first few samples of the batch whose input is NaN or infinite."""
    named = "; ".join(f"the {name} of sample {key} in shard {shard}" for shard, key, name in bad_inputs[:3])
    more = f" and {len(bad_inputs) - 3} more" if len(bad_inputs) > 3 else ""
    log.warning("iteration %d: non-finite values in %s%s", iteration, named, more)
