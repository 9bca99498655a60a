"""Training entry point: teacher pretraining (flow matching) and distillation (rCM, sCM, DMD, dCM).

    python -m rcm.train experiment=toy_rcm                    # one process
    torchrun --nproc_per_node=2 -m rcm.train experiment=toy_rcm  # data parallel (gloo on CPU)
    python -m rcm.train --help                                # every option

The run directory (``run_dir``) is the unit of fault tolerance: if it holds a complete checkpoint the run
resumes from the latest one, so a requeued job only needs to be started again with the same config.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from rcm.cli_errors import UserError, debug_enabled, run_cli
from rcm.config import validate_config
from rcm.launch.heartbeat import Heartbeat, describe_heartbeats
from rcm.launch.lease import LeaseHeld, RunLease, lease_run_directory
from rcm.launch.requeue import stop_and_requeue
from rcm.launch.signals import StopRequest
from rcm.parallel.distributed import init_distributed, resolve_device, shutdown_distributed
from rcm.training.metrics_log import MetricsLog
from rcm.training.monitor import TrainingMonitor, pin_cpu_affinity
from rcm.training.nonfinite import NonFiniteBudget, StepOutcome
from rcm.training.samples import TrainingSamples
from rcm.training.state import TrainingState, build_network, load_negative_embedding
from rcm.training.step import lr_factor, train_step

__all__ = ["Trainer", "train", "build_network", "lr_factor", "load_negative_embedding", "main"]

log = logging.getLogger("rcm.train")
# Failures whose message names the bad file or key: they end in that one sentence. Anything else is a crash
# (a collective timing out, out of memory, a bug) and its traceback goes to the log as well.
INPUT_ERRORS = (UserError, FileNotFoundError, ValueError)


class Trainer(TrainingState):
    """A run's state (rcm/training/state.py) and the loop that trains it: ``step`` (rcm/training/step.py) until
    ``train.max_iters``, with interval saves, logs and stop signals."""

    last_outcome: StepOutcome | None = None
    monitor: TrainingMonitor | None = None

    def step(self) -> dict[str, Any]:
        """One iteration: a batch, the scheduled network's loss, backward, gradient sync, update; returns its logs."""
        self.last_outcome = train_step(self, self.monitor.timer if self.monitor is not None else None)
        return self.last_outcome.logs

    def run(self, stop: StopRequest | None = None, heartbeat: Heartbeat | None = None,
            lease: RunLease | None = None) -> dict[str, Any]:
        """Train to ``max_iters`` with interval saves and a final save; returns the last logs.

        With ``stop``, a stop signal (pre-timeout, preemption) on any rank ends the run early on every rank,
        after the current iteration and a checkpoint of it; the logs then hold ``stopped_by`` (the signal).
        Too many updates skipped on non-finite values (``train.max_skipped_updates``) end it with
        NonFiniteBudgetExceeded; losing the run directory's ``lease`` (main rank) with LeaseHeld.
        """
        cfg = self.cfg.train
        self.resume()
        budget = NonFiniteBudget(cfg.max_skipped_updates, cfg.skipped_updates_window, self.info.world_size, self.device)
        logs: dict[str, Any] = {}
        started = time.time()
        self.monitor = monitor = TrainingMonitor(self, heartbeat)
        samples = TrainingSamples(self) if cfg.sample_every else None
        with MetricsLog(self.cfg.run_dir, self.iteration, cfg.max_iters, cfg.log_every, self.info.is_main,
                        cfg.progress_bar, self.cfg.name, self.cfg.logging.backends, self.cfg.logging.dir,
                        self.cfg.logging.wandb_project, _plain_config(self.cfg)) as metrics:
            if samples is not None and self.iteration == 0:  # a fresh run: the starting point too
                metrics.write(0, *samples.draw(0))
            while self.iteration < cfg.max_iters:
                logs.update(self.step())  # keeps the latest value of every network's numbers
                self.skipped_updates += budget.record(self.iteration - 1, self.last_outcome)
                if lease is not None and lease.lost:  # another run took the directory over: write nothing more
                    raise LeaseHeld(f"this run lost the lease of {lease.path} at iteration {self.iteration} "
                                    "(see the log above for its new holder) and stops without saving")
                if heartbeat is not None:
                    heartbeat.beat(self.iteration)
                if self.iteration % cfg.save_every == 0 or self.iteration == cfg.max_iters:
                    with monitor.timer.phase("checkpoint"):  # what an (asynchronous) save holds training up
                        self.save()
                monitor.end_step(logs["role"])
                observed = monitor.observe(self.iteration, metrics.due(self.iteration))
                drawn, images = {}, None
                if samples is not None and samples.due(self.iteration):
                    with monitor.timer.excluded():
                        drawn, images = samples.draw(self.iteration)
                metrics.record(self.iteration, {**logs, **observed, **drawn}, images, force=bool(drawn))
                if stop is not None and self.iteration < cfg.max_iters and stop.should_stop(self.iteration):
                    self.save(wait=True)  # on disk before the job is requeued; at once if this iteration is saved
                    logs["stopped_by"] = stop.signal_name
                    break
        if self.info.is_main and "stopped_by" in logs:
            log.info("stopped on %s at iteration %d after %.1f s; checkpoint saved", logs["stopped_by"], self.iteration, time.time() - started)
        elif self.info.is_main:
            log.info("finished %d iterations in %.1f s", self.iteration, time.time() - started)
        return {"iteration": self.iteration, **logs}


def _plain_config(cfg: Any) -> dict:
    """The resolved config as plain containers (W&B's run config)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else {}


def train(cfg: Any) -> dict[str, Any]:
    """Run (or resume) the training described by a composed config; returns the last step's logs.

    A stop signal (Slurm's pre-timeout USR2/HUP, SIGTERM on preemption) ends the run after a checkpoint;
    the job is then requeued (``launch.requeue``) and this process exits with status 128 + signal.
    """
    validate_config(cfg)
    launch = cfg.launch
    device = resolve_device(cfg.train.device)
    if cfg.logging.cpu_affinity:  # before any thread starts: threads inherit the mask
        pin_cpu_affinity(device)
    info = init_distributed(device, launch.collective_timeout_minutes, launch.nccl_env)
    try:  # one writer per run directory, before anything is written into it; every rank hears of a refusal
        lease = lease_run_directory(cfg.run_dir, info.is_main, info.world_size, launch.lease_timeout_minutes * 60,
                                    launch.heartbeat_every_s)
    except BaseException:
        shutdown_distributed()
        raise
    stop = StopRequest(info.world_size, device, launch.stop_check_every).install()
    heartbeats = Path(cfg.run_dir) / "heartbeats"
    heartbeat = Heartbeat(heartbeats, info.rank, launch.heartbeat_every_s, launch.hang_timeout_minutes * 60)
    try:
        result = Trainer(cfg, device, info).run(stop, heartbeat, lease)
        if "stopped_by" in result:
            heartbeat.close()
            stop_and_requeue(stop.agreed_signal, info, launch.requeue, launch.max_requeues)
        return result
    except Exception as error:
        if not isinstance(error, INPUT_ERRORS):  # a crash, not bad input: its traceback, and who else is stuck
            behind = describe_heartbeats(heartbeats, stale_after_s=2 * launch.heartbeat_every_s + 10, error=error)
            log.error("rank %d of %d failed%s", info.rank, info.world_size,
                      f"; ranks that froze or fell behind:\n{behind}" if behind else "", exc_info=not debug_enabled())
        raise
    finally:
        heartbeat.close()
        stop.uninstall()
        if lease is not None:
            lease.release()
        shutdown_distributed()


def _use_sweep_directory(cfg: Any) -> None:
    """In a ``-m`` sweep every job trains in its own sweep subdirectory, unless ``run_dir`` is overridden."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overridden = any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN and not overridden:
        cfg.run_dir = hydra_cfg.runtime.output_dir


def main() -> None:
    """Hydra app: `python -m rcm.train [experiment=NAME] [key=value ...]`."""
    import hydra

    from rcm.config import register_configs

    register_configs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    @hydra.main(config_path="../configs", config_name="config", version_base="1.3")
    def _app(cfg) -> None:
        _use_sweep_directory(cfg)
        # A failure ends in one sentence (RCM_DEBUG=1 adds the traceback) and exit status 1 from every launcher:
        # Hydra would otherwise keep the error in the job's return value, and a submitit task would end with
        # status 0 while its peers wait in a collective.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        program = f"rcm.train (rank {os.environ.get('RANK', '0')})" if world_size > 1 else "rcm.train"
        status = run_cli(lambda: None if train(cfg) else None, program)
        if status:
            raise SystemExit(status)

    _app()

if __name__ == "__main__":
    main()
