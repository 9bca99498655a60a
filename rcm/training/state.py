"""Everything a run holds (networks, optimizers, EMA, data, RNG, counters, checkpoints): how it is built, what a
checkpoint saves of it, and how a resume restores it."""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rcm.checkpoint.manager import CheckpointManager, checkpoint_entries, iteration_of
from rcm.checkpoint.resharding import rank_state_for_new_world
from rcm.checkpoint.weights import copy_weights, load_model_weights, resolve_checkpoint
from rcm.data.shards import ShardLoader
from rcm.distill.distiller import STUDENT, Distiller, uses_fake_score
from rcm.distill.ema import PowerEMA
from rcm.models.wan_dit import WanDiT, WanDiTConfig
from rcm.parallel.distributed import DistributedInfo
from rcm.parallel.mesh import build_device_mesh, data_parallel_rank, mesh_dims
from rcm.parallel.parallelize import parallelize_wan_dit
from rcm.torch_files import read_torch_file

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
    embedding = read_torch_file(path, "data.negative_embedding", torch.Tensor, "a (tokens, text_dim) tensor",
                                mmap=False)
    if embedding.dim() == 3 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.dim() != 2:
        raise ValueError(f"data.negative_embedding {path} must be a (tokens, text_dim) tensor, got shape {tuple(embedding.shape)}")
    return embedding.float().to(device)


class TrainingState:
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
        self.skipped_updates = 0  # iterations the non-finite budget counted as skipped, over the whole run
        self.checkpoints = CheckpointManager(Path(cfg.run_dir) / "checkpoints", info, cfg.train.keep_last,
                                             cfg.train.keep_every, cfg.train.async_save, cfg.train.async_save_mode,
                                             restart_if_all_damaged=cfg.train.restart_if_all_damaged)

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
            "skipped_updates": self.skipped_updates,
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
        self.skipped_updates = rank_state.get("skipped_updates", 0)  # absent from older checkpoints
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
