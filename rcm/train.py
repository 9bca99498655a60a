"""Training entry point: teacher pretraining (flow matching) and distillation (rCM, sCM, DMD, dCM).

    python -m rcm.train experiment=toy_rcm                    # one process
    torchrun --nproc_per_node=2 -m rcm.train experiment=toy_rcm  # data parallel (gloo on CPU)
    python -m rcm.train --help                                # every option

The run directory (``run_dir``) is the unit of fault tolerance: if it holds a complete checkpoint the run
resumes from the latest one, so a requeued job only needs to be started again with the same config.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rcm.checkpoint.manager import CheckpointManager, checkpoint_entries, iteration_of
from rcm.checkpoint.resharding import rank_state_for_new_world
from rcm.checkpoint.weights import copy_weights, load_model_weights, resolve_checkpoint
from rcm.config import validate_config
from rcm.data.shards import ShardLoader
from rcm.distill.distiller import STUDENT, Distiller, uses_fake_score
from rcm.distill.ema import PowerEMA
from rcm.launch.heartbeat import Heartbeat, describe_heartbeats
from rcm.launch.requeue import stop_and_requeue
from rcm.launch.signals import StopRequest
from rcm.models.wan_dit import WanDiT, WanDiTConfig
from rcm.parallel.gradient_accumulation import backward_micro_batches, split_micro_batches
from rcm.parallel.mesh import build_device_mesh, data_parallel_rank, mesh_dims
from rcm.parallel.parallelize import parallelize_wan_dit
from rcm.parallel.distributed import (
    DistributedInfo,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)

log = logging.getLogger("rcm.train")


def build_network(model_cfg: Any, device: str | torch.device | None = None) -> WanDiT:
    """The DiT described by the ``model`` config node, built on ``device`` (default: the current default)."""
    fields = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    with contextlib.nullcontext() if device is None else torch.device(device):
        return WanDiT(WanDiTConfig(**fields))


def load_negative_embedding(path: str | None, device: torch.device) -> torch.Tensor | None:
    """The negative prompt's text embedding (L, text_dim), CFG's unconditional branch."""
    if not path:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.negative_embedding: file {path} does not exist")
    embedding = torch.load(path, map_location="cpu", weights_only=True)
    if embedding.dim() == 3 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.dim() != 2:
        raise ValueError(f"data.negative_embedding {path} must be a (tokens, text_dim) tensor, got shape {tuple(embedding.shape)}")
    return embedding.float().to(device)


class Trainer:
    """Everything a run holds: networks, optimizers, EMA, data, RNG, counters, checkpoints."""

    def __init__(self, cfg: Any, device: torch.device, info: DistributedInfo):
        self.cfg, self.device, self.info = cfg, device, info
        if info.is_main:  # the resolved config beside the checkpoints: evaluation reads it from here
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        distill, optim = cfg.distill, cfg.optim
        torch.manual_seed(cfg.train.seed)  # identical initialization on every rank
        distilling = distill.method != "flow_matching"
        # Distillation starts every network from the teacher's weights, so none is initialized: all are built on
        # the meta device (no memory), sharded, and only then given memory and weights, each rank its own part.
        # Three full 14B networks per rank would not fit (docs/benchmarks.md).
        self.student = build_network(cfg.model, device="meta") if distilling else build_network(cfg.model).to(device)
        self.teacher = self.fake_score = None
        if distilling:
            self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
            if uses_fake_score(distill.method, distill.loss_scale_dmd):
                self.fake_score = copy.deepcopy(self.student)
        # Sharding comes after every network exists (a sharded module cannot be deep-copied) and before
        # optimizers and EMA (they must hold the sharded parameters).
        self.mesh = build_device_mesh(cfg.parallel, info.world_size, device.type, cfg.model.num_heads)
        for network in (self.student, self.fake_score):
            if network is not None:
                parallelize_wan_dit(network, self.mesh, cfg.parallel)
        if self.teacher is not None:
            parallelize_wan_dit(self.teacher, self.mesh, cfg.parallel, frozen=True)
        if distilling:
            self._start_from_teacher(distill.teacher_checkpoint, device)
        # Ranks of one context-parallel group must draw the same batch, noise and times.
        data_rank, data_world = data_parallel_rank(self.mesh), mesh_dims(self.mesh).data_parallel_size
        betas = tuple(optim.betas)
        self.optimizers = {
            STUDENT: torch.optim.AdamW(self.student.parameters(), lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)
        }
        if self.fake_score is not None:
            self.optimizers["fake_score"] = torch.optim.AdamW(
                self.fake_score.parameters(), lr=optim.lr_fake_score, betas=betas, weight_decay=optim.weight_decay
            )
        self.base_lr = {STUDENT: optim.lr, "fake_score": optim.lr_fake_score}
        self.ema = PowerEMA(self.student, distill.ema_sigma_rel)
        self.generator = torch.Generator(device).manual_seed(cfg.train.seed * 100_003 + data_rank)
        self.negative_embedding = load_negative_embedding(cfg.data.negative_embedding, device)
        self.loader = ShardLoader(
            cfg.data.shards,
            batch_size=cfg.train.batch_size,
            latent_shape=tuple(cfg.data.latent_shape),
            text_len=cfg.model.text_len,
            text_dim=cfg.model.text_dim,
            seed=cfg.train.seed,
            rank=data_rank,
            world_size=data_world,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        self.distiller = Distiller(distill, self.student, self.teacher, self.fake_score, self.negative_embedding, self.generator)
        self.iteration = 0
        self.student_iteration = 0
        self.skipped_steps = 0
        self.checkpoints = CheckpointManager(Path(cfg.run_dir) / "checkpoints", info, cfg.train.keep_last,
                                             cfg.train.keep_every, cfg.train.async_save, cfg.train.async_save_mode)

    def networks(self) -> dict[str, torch.nn.Module]:
        """The trainable networks by role."""
        return {STUDENT: self.student, **({"fake_score": self.fake_score} if self.fake_score is not None else {})}

    def _start_from_teacher(self, checkpoint: str, device: torch.device) -> None:
        """Give the (meta, sharded) networks memory on ``device`` and the teacher's weights: read once into the
        student, then copied shard by shard into the fake score and the teacher."""
        self.student.to_empty(device=device)
        source = load_model_weights(self.student, checkpoint, prefer="ema")
        log.info("teacher weights from %s (%s)", checkpoint, source)
        for network in (self.fake_score, self.teacher):
            if network is not None:
                network.to_empty(device=device)
                copy_weights(self.student, network)

    # -- checkpointing --
    def checkpoint_state(self) -> dict[str, Any]:
        """What DCP saves: model weights, optimizer states, EMA."""
        state: dict[str, Any] = {"ema": self.ema.state_dict()}
        for role, network in self.networks().items():
            state[role] = get_model_state_dict(network)
            state[f"optim_{role}"] = get_optimizer_state_dict(network, self.optimizers[role])
        return state

    def rank_state(self) -> dict[str, Any]:
        """What each rank saves for itself: RNG, data position, counters."""
        return {
            "iteration": self.iteration,
            "student_iteration": self.student_iteration,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "loader": self.loader.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self, wait: bool | None = None) -> Path:
        """Collective checkpoint of the current iteration: asynchronous with ``train.async_save``, except the
        final one, which returns only once it is complete (as does any save with ``wait``)."""
        if wait is None:
            wait = self.iteration >= self.cfg.train.max_iters
        return self.checkpoints.save(self.iteration, self.checkpoint_state(), self.rank_state(), wait=wait)

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the training state from ``path``; else from this run's newest loadable checkpoint (the requeue
        path); else from ``train.resume_from`` (everything, or only the weights). Returns whether anything loaded."""
        cfg = self.cfg.train
        if path is None:
            path = self.checkpoints.latest_loadable(check_crc=cfg.verify_on_resume)
            if path is None and cfg.resume_from:
                if cfg.resume_weights_only:
                    self._load_weights(resolve_checkpoint(cfg.resume_from))
                    return True
                path = resolve_checkpoint(cfg.resume_from)
            if path is None:
                return False
        state = self.checkpoint_state()
        rank_state = self.checkpoints.load(path, state)
        self.ema.load_state_dict(state["ema"])
        for role, network in self.networks().items():
            set_model_state_dict(network, state[role])
            set_optimizer_state_dict(network, self.optimizers[role], state[f"optim_{role}"])
        self.iteration = iteration_of(path)
        if rank_state is None:  # written by another world size: per-rank state is re-derived, not copied
            saved = self.checkpoints.rank_states(path)
            rank_state, explanation = rank_state_for_new_world(saved, self.loader, cfg.seed, self.iteration, self.info.rank, self.device)
            if self.info.is_main:
                log.warning("checkpoint %s was %s", path, explanation)
        self.student_iteration = rank_state["student_iteration"]
        self.generator.set_state(rank_state["generator"])
        torch.set_rng_state(rank_state["torch_rng"])
        self.loader.load_state_dict(rank_state["loader"])
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _load_weights(self, path: Path) -> None:
        """Only the networks and EMA from ``path`` (fine-tuning, a new phase): optimizers and counters start fresh."""
        source = load_model_weights(self.student, path, prefer="student")
        entries = checkpoint_entries(path) if (path / ".metadata").is_file() else set()  # DCP, not .pth/.safetensors
        if "ema" in entries:
            self.checkpoints.load_entries(path, {"ema": self.ema.state_dict()})
        else:  # no EMA saved: it starts at the loaded weights, as it does at initialization
            with torch.no_grad():
                for name, parameter in self.student.named_parameters():
                    self.ema.shadow[name].copy_(parameter)
        if self.fake_score is not None and "fake_score" in entries:
            fake_score = get_model_state_dict(self.fake_score)
            self.checkpoints.load_entries(path, {"fake_score": fake_score})
            set_model_state_dict(self.fake_score, fake_score)
        log.info("weights from %s (%s%s); optimizers and counters start fresh", path, source,
                 ", fake score" if self.fake_score is not None and "fake_score" in entries else "")

    # -- the loop --
    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.train.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lr(self, role: str) -> None:
        optim = self.cfg.optim
        factor = lr_factor(self.iteration, optim.warmup_iters, self.cfg.train.max_iters, optim.decay, optim.min_lr_ratio)
        for group in self.optimizers[role].param_groups:
            group["lr"] = self.base_lr[role] * factor

    def step(self) -> dict[str, float]:
        """One iteration: a batch, the scheduled network's loss, backward, gradient sync, update."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(self.loader).items()}
        role = STUDENT if self.distiller.method == "flow_matching" else self.distiller.kind(self.iteration)
        network, optimizer = self.networks()[role], self.optimizers[role]
        self._set_lr(role)
        optimizer.zero_grad(set_to_none=True)

        def micro_batch_loss(micro_batch):
            with self._autocast():
                return self.distiller.loss(micro_batch, self.iteration, self.student_iteration)

        micro_batches = split_micro_batches(batch, self.cfg.parallel.grad_accumulation)
        result = backward_micro_batches(network, micro_batches, micro_batch_loss)[-1]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # a NaN that the loss guards could not stop (e.g. inside the network): skip, don't poison Adam
            self.skipped_steps += 1
            log.warning("iteration %d: non-finite %s gradient norm, update skipped", self.iteration, role)
        if role == STUDENT:
            self.ema.update(self.student, self.student_iteration)
            self.student_iteration += 1
        self.iteration += 1
        return {"role": role, f"grad_norm/{role}": float(grad_norm), **result.logs}

    def run(self, stop: StopRequest | None = None, heartbeat: Heartbeat | None = None) -> dict[str, Any]:
        """Train to ``max_iters`` with interval saves and a final save; returns the last logs.

        With ``stop``, a stop signal (pre-timeout, preemption) on any rank ends the run early on every rank,
        after the current iteration and a checkpoint of it; the logs then hold ``stopped_by`` (the signal).
        """
        cfg = self.cfg.train
        self.resume()
        run_dir = Path(self.cfg.run_dir)
        metrics_file = open(run_dir / "metrics.jsonl", "a") if self.info.is_main else None
        progress = _progress(self.iteration, cfg.max_iters, enabled=cfg.progress_bar and self.info.is_main, desc=self.cfg.name)
        logs: dict[str, Any] = {}
        started = time.time()
        try:
            while self.iteration < cfg.max_iters:
                logs.update(self.step())  # keeps the latest value of every network's numbers
                progress.update(1)
                if heartbeat is not None:
                    heartbeat.beat(self.iteration)
                if self.iteration % cfg.log_every == 0 or self.iteration == cfg.max_iters:
                    shown = {k: round(v, 4) for k, v in logs.items() if k.startswith("loss/")}
                    progress.set_postfix(shown, refresh=False)
                    if metrics_file:
                        metrics_file.write(json.dumps({"iteration": self.iteration, **logs}) + "\n")
                        metrics_file.flush()
                if self.iteration % cfg.save_every == 0 or self.iteration == cfg.max_iters:
                    self.save()
                if stop is not None and self.iteration < cfg.max_iters and stop.should_stop(self.iteration):
                    self.save(wait=True)  # on disk before the job is requeued; at once if this iteration is saved
                    logs["stopped_by"] = stop.signal_name
                    break
        finally:
            progress.close()
            if metrics_file:
                metrics_file.close()
        if self.info.is_main and "stopped_by" in logs:
            log.info("stopped on %s at iteration %d after %.1f s; checkpoint saved", logs["stopped_by"], self.iteration, time.time() - started)
        elif self.info.is_main:
            log.info("finished %d iterations in %.1f s", self.iteration, time.time() - started)
        return {"iteration": self.iteration, **logs}


def _progress(initial: int, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)


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


def train(cfg: Any) -> dict[str, Any]:
    """Run (or resume) the training described by a composed config; returns the last step's logs.

    A stop signal (Slurm's pre-timeout USR2/HUP, SIGTERM on preemption) ends the run after a checkpoint;
    the job is then requeued (``launch.requeue``) and this process exits with status 128 + signal.
    """
    validate_config(cfg)
    launch = cfg.launch
    device = resolve_device(cfg.train.device)
    info = init_distributed(device, launch.collective_timeout_minutes, launch.nccl_env)
    stop = StopRequest(info.world_size, device, launch.stop_check_every).install()
    heartbeats = Path(cfg.run_dir) / "heartbeats"
    heartbeat = Heartbeat(heartbeats, info.rank, launch.heartbeat_every_s, launch.hang_timeout_minutes * 60)
    try:
        result = Trainer(cfg, device, info).run(stop, heartbeat)
        if "stopped_by" in result:
            heartbeat.close()
            stop_and_requeue(stop.agreed_signal, info, launch.requeue, launch.max_requeues)
        return result
    except Exception:
        behind = describe_heartbeats(heartbeats, stale_after_s=2 * launch.heartbeat_every_s + 10)
        log.error("rank %d of %d failed%s", info.rank, info.world_size,
                  f"; ranks that froze or fell behind:\n{behind}" if behind else "")
        raise
    finally:
        heartbeat.close()
        stop.uninstall()
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
        try:
            train(cfg)
        except Exception:
            # Exit non-zero from every launcher: Hydra would otherwise keep the error in the job's return
            # value, and a submitit task would end with status 0 while its peers wait in a collective.
            log.exception("training failed (rank %s)", os.environ.get("RANK", "0"))
            raise SystemExit(1) from None

    _app()


if __name__ == "__main__":
    main()
