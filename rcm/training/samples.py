"""Samples while training (``train.sample_every``): at the start of a run and every ``sample_every`` iterations,
the student and its EMA draw fixed-seed samples of every toy prompt (class) at 1, 2 and 4 steps; the main rank
scores them against the toy's ground truth (precision, recall, mode KL, sliced W2), saves the plot under
``<run_dir>/samples/`` and sends both to every metrics backend.

The same noise at every draw (seeded by ``train.seed`` and the class alone), so the curves compare like with like.
Classes are split over the data-parallel ranks in equal numbers (sharded networks need every rank in every
forward) and gathered. A failure while sampling is logged and counted (``samples/failures``), never fatal.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rcm.data.metrics import toy_metrics
from rcm.data.toy import ToyMixture
from rcm.distill.sampler import sample_student
from rcm.distill.trigflow import denoise, pad_tokens
from rcm.parallel.mesh import data_parallel_rank, mesh_dims
from rcm.training.state import TrainingState
from rcm.training.step import autocast

log = logging.getLogger("rcm.train")
SAMPLE_STEPS = (1, 2, 4)
SAMPLES_PER_CLASS = 16
SAMPLES_DIR = "samples"
TOY_METRICS = ("precision", "recall", "mode_kl", "sliced_wasserstein")
SLICED_WASSERSTEIN_PROJECTIONS = 128  # rcm.evaluate's number: the in-training curve and its report agree


@contextmanager
def ema_weights(state: TrainingState):
    """The student holds its EMA weights inside the block, its own again after it."""
    student = state.student
    with torch.no_grad():
        own = {name: parameter.detach().clone() for name, parameter in student.named_parameters()}
        state.ema.copy_to(student)
    try:
        yield student
    finally:
        with torch.no_grad():
            for name, parameter in student.named_parameters():
                parameter.copy_(own[name])


class TrainingSamples:
    """The draws of one run: ``due`` says when, ``draw`` returns the logs and images of one."""

    def __init__(self, state: TrainingState):
        self.state = state
        cfg = state.cfg
        self.every = cfg.train.sample_every
        self.mixture = ToyMixture.load(cfg.data.ground_truth)
        self.failures = 0
        data_parallel_size = mesh_dims(state.mesh).data_parallel_size
        classes = list(range(self.mixture.config.num_classes))[data_parallel_rank(state.mesh)::data_parallel_size]
        # Equal counts on every rank: a rank with fewer classes repeats its first and drops the copies.
        per_rank = math.ceil(self.mixture.config.num_classes / data_parallel_size)
        self.classes = classes + [classes[0] if classes else 0] * (per_rank - len(classes))
        self.owned = len(classes)

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` (finished iterations) is one to draw at."""
        return self.every is not None and iteration % self.every == 0

    def draw(self, iteration: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Draw, score and plot (main rank); returns ({key: number}, {key: HWC uint8 image}) for the backends.
        A failure is a warning and a count, and training goes on."""
        try:
            samples = self._gather({name: self._sample_network(name) for name in ("student", "ema")})
            if not self.state.info.is_main:
                return {}, {}
            return self._score_and_plot(samples, iteration)
        except Exception as error:  # noqa: BLE001 - sampling must never end a training run
            self.failures += 1
            log.warning("iteration %d: drawing samples failed (%s: %s); training goes on (%d failed draws so far)",
                        iteration, type(error).__name__, error, self.failures, exc_info=log.isEnabledFor(logging.DEBUG))
            return {"samples/failures": float(self.failures)}, {}

    @torch.no_grad()
    def _sample_network(self, name: str) -> dict[int, list[torch.Tensor]]:
        """{steps: [samples (SAMPLES_PER_CLASS, C, T, H, W) of each class this rank owns]} of the student or EMA."""
        weights = ema_weights(self.state) if name == "ema" else _as_is(self.state.student)
        with weights as network:
            drawn = {steps: self._sample_classes(network, steps) for steps in SAMPLE_STEPS}
        return {steps: list(batch.split(SAMPLES_PER_CLASS))[: self.owned] for steps, batch in drawn.items()}

    def _sample_classes(self, network: torch.nn.Module, steps: int) -> torch.Tensor:
        """One batch of SAMPLES_PER_CLASS samples of each of this rank's classes, in order; the initial noise of a
        class is seeded by the class alone, the student's re-noising by this rank's first class."""
        state, mixture, device = self.state, self.mixture, self.state.device
        seed = state.cfg.train.seed * 1_000_003
        noise = torch.cat([torch.randn((SAMPLES_PER_CLASS, *mixture.config.latent_shape), device=device,
                                       generator=torch.Generator(device).manual_seed(seed + class_id))
                           for class_id in self.classes])
        context = torch.cat([pad_tokens(mixture.embeddings[class_id].to(device).unsqueeze(0), state.cfg.model.text_len)
                             .expand(SAMPLES_PER_CLASS, -1, -1) for class_id in self.classes])
        generator = torch.Generator(device).manual_seed(seed + self.classes[0] + 7919)
        with autocast(state):
            x0 = sample_student(lambda x, t, c: denoise(network, x, t, c), noise, context, steps,
                                state.cfg.distill.sample_sigma_max, generator)
        return x0.float().cpu()

    def _gather(self, mine: dict[str, dict[int, list[torch.Tensor]]]) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """{(network, steps): (samples (N,C,T,H,W), class ids (N,))} over every rank's classes."""
        owned = self.classes[: self.owned]
        parts = [(owned, mine)]
        if self.state.info.world_size > 1:
            parts = [None] * self.state.info.world_size
            dist.all_gather_object(parts, (owned, mine))
        merged: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for name in mine:
            for steps in SAMPLE_STEPS:
                by_class = {}
                for classes, drawn in parts:  # the ranks of a context-parallel group drew the same classes: once
                    for class_id, samples in zip(classes, drawn[name][steps]):
                        by_class.setdefault(class_id, samples)
                ids = sorted(by_class)
                merged[(name, steps)] = (torch.cat([by_class[c] for c in ids]),
                                         torch.cat([torch.full((SAMPLES_PER_CLASS,), c) for c in ids]))
        return merged

    def _score_and_plot(self, samples: dict, iteration: int) -> tuple[dict[str, float], dict[str, Any]]:
        from rcm.plots import plot_toy_samples

        logs = {}
        for (name, steps), (latents, ids) in samples.items():
            scores = toy_metrics(latents, ids, self.mixture, SLICED_WASSERSTEIN_PROJECTIONS)
            logs.update({f"samples/{name}_{steps}step/{metric}": float(scores[metric]) for metric in TOY_METRICS})
        logs["samples/failures"] = float(self.failures)
        path = Path(self.state.cfg.run_dir) / SAMPLES_DIR / f"iter_{iteration:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        panels = {f"{name} {steps} step{'s' if steps > 1 else ''}": pair for (name, steps), pair in samples.items()}
        plot_toy_samples(panels, self.mixture, path)
        return logs, {"samples/toy": _read_png(path)}


@contextmanager
def _as_is(network: torch.nn.Module):
    yield network


def _read_png(path: Path):
    """The PNG at ``path`` as an (H, W, 3) uint8 array."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(path)[..., :3]
    return (image * 255).round().astype(np.uint8) if image.dtype != np.uint8 else image
