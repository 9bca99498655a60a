"""What the loop reports besides its losses (rcm/observe does the measuring): step times and throughput, MFU,
CUDA memory, learning rates and skipped updates into the metrics; GPU telemetry and straggler checks every few
iterations, into the metrics (main rank) and every rank's heartbeat."""
from __future__ import annotations

import logging
import math
import socket
from typing import Any

import torch

from rcm.distill.distiller import STUDENT
from rcm.distill.flops import bf16_peak_flops, rcm_student_step_flops
from rcm.launch.heartbeat import Heartbeat
from rcm.observe.affinity import pin_to_gpu_cpus
from rcm.observe.gpu_telemetry import GpuTelemetry
from rcm.observe.nvml import load_nvml, nvml_handle
from rcm.observe.step_timing import StepTimer, cuda_memory_metrics, window_metrics
from rcm.observe.stragglers import StragglerWatch
from rcm.parallel.mesh import mesh_dims
from rcm.training.state import TrainingState

log = logging.getLogger("rcm.train")


def tokens_per_sample(cfg: Any) -> int:
    """Video tokens of one sample: the latent's T × H × W over the model's patch size."""
    return math.prod(size // patch for size, patch in zip(cfg.data.latent_shape[1:], cfg.model.patch_size))


def pin_cpu_affinity(device: torch.device) -> set[int] | None:
    """On a GPU, restrict this process to the CPU cores near its GPU (``logging.cpu_affinity``); returns the cores,
    or None where nothing was pinned (a CPU run, no NVML, no usable mask).

    Call it before the process group and the data loader start their threads: the mask is per thread and only
    threads started later inherit it."""
    if device.type != "cuda":
        return None
    nvml = load_nvml()
    if nvml is None:
        return None
    index = device.index or 0
    where = f"GPU {index} of host {socket.gethostname()}"
    cores = pin_to_gpu_cpus(nvml, nvml_handle(nvml, index), where)
    if cores is not None:
        log.info("the process of %s is pinned to %d CPU cores near it", where, len(cores))
    return cores


class TrainingMonitor:
    """Times the steps of ``state`` (``timer``) and adds what was measured to the logs of the iterations it is
    asked about; ``heartbeat`` (optional) gets this rank's GPU readings and straggler findings."""

    def __init__(self, state: TrainingState, heartbeat: Heartbeat | None = None):
        self.state, self.heartbeat = state, heartbeat
        cfg, info = state.cfg, state.info
        self.every = cfg.logging
        self.timer = StepTimer(state.device)
        self.logged = self.timer.snapshot()
        self.checked = self.timer.snapshot()
        self.data_parallel_size = mesh_dims(state.mesh).data_parallel_size
        self.samples_per_step = cfg.train.batch_size * self.data_parallel_size
        self.tokens = tokens_per_sample(cfg)
        self.peak_flops = None
        if state.device.type == "cuda" and cfg.train.mixed_precision == "bf16":
            self.peak_flops = bf16_peak_flops(torch.cuda.get_device_name(state.device))
        self.telemetry = self._gpu_telemetry() if self.every.telemetry_every > 0 else None
        self.stragglers = (StragglerWatch(info.world_size, info.local_rank, self.every.straggler_factor, state.device)
                           if self.every.straggler_every > 0 and info.world_size > 1 else None)

    def _gpu_telemetry(self) -> GpuTelemetry | None:
        if self.state.device.type != "cuda":
            return None
        nvml = load_nvml()
        if nvml is None:
            return None
        index = self.state.device.index or 0
        where = f"GPU {index} of host {socket.gethostname()} (rank {self.state.info.rank})"
        return GpuTelemetry(nvml, nvml_handle(nvml, index), where)

    def step_flops(self, role: str) -> float | None:
        """Model FLOPs of the step just taken over all ranks, where rcm.distill.flops counts them (an rCM student
        step; the fake score's steps and the other methods are not counted)."""
        state = self.state
        if state.distiller.method != "rcm" or role != STUDENT:
            return None
        per_sample = rcm_student_step_flops(state.cfg.model, self.tokens, state.cfg.model.text_len,
                                            state.student_iteration - 1)
        return (per_sample.linear + per_sample.attention) * self.samples_per_step

    def end_step(self, role: str) -> None:
        """The iteration of ``role`` ended (its checkpoint stall included)."""
        self.timer.end_step(self.step_flops(role))

    def observe(self, iteration: int, log_due: bool) -> dict[str, float]:
        """The measured numbers for ``iteration``'s logs: telemetry and straggler checks when due (the latter a
        collective: every rank calls this at every iteration), step metrics when ``log_due``."""
        logs: dict[str, float] = {}
        if self.telemetry is not None and iteration % self.every.telemetry_every == 0:
            readings = self.telemetry.read()
            logs.update(readings)
            if self.heartbeat is not None:
                self.heartbeat.report(gpu={k.removeprefix("gpu/"): v for k, v in readings.items()})
        if self.stragglers is not None and iteration % self.every.straggler_every == 0:
            logs.update(self._check_stragglers(iteration))
        if log_due:
            now = self.timer.snapshot()
            logs.update(window_metrics(now.minus(self.logged), self.samples_per_step, self.tokens, self.peak_flops,
                                       self.state.info.world_size))
            self.logged = now
            logs.update(cuda_memory_metrics(self.state.device))
            for role, optimizer in self.state.optimizers.items():
                logs[f"lr/{role}"] = optimizer.param_groups[0]["lr"]
            logs["skipped_updates"] = float(self.state.skipped_updates)
        return logs

    def _check_stragglers(self, iteration: int) -> dict[str, float]:
        now = self.timer.snapshot()
        window = now.minus(self.checked)
        logs, slow = self.stragglers.check(window)
        self.checked = now
        info = self.state.info
        if slow and info.is_main:
            log.warning("iteration %d: %d of %d ranks are slow: %s", iteration, len(slow), info.world_size,
                        "; ".join(s.describe() for s in slow))
        if self.heartbeat is not None:
            mine = next((s for s in slow if s.rank == info.rank), None)
            self.heartbeat.report(step_s=window.wall_s / max(window.steps, 1), slow=None if mine is None else
                                  {"phase": mine.phase, "seconds": mine.seconds, "median_s": mine.median_s})
        return logs
