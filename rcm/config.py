"""The typed configuration tree. Hydra composes `configs/` onto this schema, so an unknown key or a
wrong type fails at start with the key's name; `validate_config` adds the cross-field checks."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from rcm.checkpoint.manager import ASYNC_MODES
from rcm.cli_errors import UserError
from rcm.distill.dcm import check_skip_interval
from rcm.distill.dmd import FIXED_INTERMEDIATE_TIMES
from rcm.distill.time import TimeSamplerConfig, as_time_sampler_config
from rcm.distill.trigflow import check_guidance_scale, uses_guidance
from rcm.models.wan_dit import WanDiTConfig
from rcm.observe.backends import check_backends, check_writable_directory
from rcm.parallel.mesh import parallel_config_problems

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("flow_matching", "rcm", "scm", "dmd", "dcm")


@dataclass
class DataConfig:
    """Where the webdataset shards are and what a sample must look like."""

    shards: str = MISSING
    latent_shape: list[int] = MISSING  # C, T, H, W
    shuffle_buffer: int = 1000
    negative_embedding: Optional[str] = None  # .pt tensor (L, text_dim): the unconditional branch
    ground_truth: Optional[str] = None  # toy only: the mixture's ground_truth.pt, for evaluation


@dataclass
class DistillConfig:
    """The method and its constants (rcm_spec.md §2–§4); defaults are the Wan2.1 recipe."""

    method: str = "rcm"
    teacher_checkpoint: Optional[str] = None  # .pth file, DCP checkpoint or run directory
    guidance_scale: float = 5.0
    tangent_warmup: int = 1000
    student_update_freq: int = 5
    loss_scale: float = 100.0
    loss_scale_dmd: float = 1.0
    scm_time: TimeSamplerConfig = field(default_factory=lambda: TimeSamplerConfig("lognormal", 0.7, 1.6))
    dmd_time: TimeSamplerConfig = field(default_factory=lambda: TimeSamplerConfig("uniform_shift", shift=5.0))
    dmd_fix_timesteps: bool = False
    # DMD backward simulation: n = (k mod max_simulation_steps) + 1 student steps, k the student's or critic's counter
    max_simulation_steps: int = 4
    dcm_num_steps: int = 48  # dCM: Δ = 1/dcm_num_steps of (unshifted) RF time
    dcm_skip_interval: int = 1  # dCM: the teacher walks m = this many Δ-steps between the two student calls
    dcm_shift: float = 5.0
    ema_sigma_rel: float = 0.1
    # σ_max of the student's samples drawn for this run's validation and evaluation (rcm.evaluate's default)
    sample_sigma_max: float = 80.0
    # flow_matching (teacher pretraining) only
    flow_matching_time: TimeSamplerConfig = field(default_factory=lambda: TimeSamplerConfig("uniform_shift", shift=3.0))
    unconditional_probability: float = 0.1


@dataclass
class OptimConfig:
    """AdamW for the student and for the fake score."""

    lr: float = 2e-6
    lr_fake_score: float = 4e-7
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    warmup_iters: int = 0
    decay: str = "none"  # none | linear | cosine: from the end of warmup to train.max_iters
    min_lr_ratio: float = 0.0  # the decay ends at lr × this
    grad_clip: float = 0.0  # 0 disables clipping (the recipe uses none)


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, logging and checkpoint cadence."""

    max_iters: int = 100_000
    batch_size: int = 1  # per data-parallel rank
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "bf16"  # bf16 | none (bf16 autocast is used only on CUDA)
    log_every: int = 50
    save_every: int = 500
    keep_last: int = 3
    # checkpoints (rcm/checkpoint): also keep every checkpoint whose iteration is a multiple of this (0: none)
    keep_every: int = 0
    async_save: bool = True  # interval saves with dcp.async_save: training goes on while they are written
    # "process": write from a separate process (no GIL shared with training; 3.2 % steady stall against the thread's
    # 8.7 % for the 1.3B state on an H100) at the price of /dev/shm space and one open file per staged tensor.
    async_save_mode: str = "thread"
    resume_from: Optional[str] = None  # run dir, DCP checkpoint or .pth to start from when run_dir has none
    resume_weights_only: bool = False  # from resume_from take only the networks and EMA (fine-tuning, new optimizers)
    verify_on_resume: bool = True  # check every shard's CRC-32 before resuming; a damaged checkpoint is skipped
    # every checkpoint of run_dir damaged: false stops with the damaged files named; true starts over from iteration 0
    restart_if_all_damaged: bool = False
    # More updates than this skipped on NaN/inf (non-finite gradient, or every sample's loss non-finite) within
    # skipped_updates_window iterations stop the run, naming the data shards (rcm/training/nonfinite.py).
    max_skipped_updates: int = 10
    skipped_updates_window: int = 100
    progress_bar: bool = True
    # At the start and every this many iterations the student and its EMA draw toy samples at 1/2/4 steps, scored
    # against data.ground_truth and plotted into <run_dir>/samples/ (rcm/training/samples.py); null: none.
    sample_every: Optional[int] = None


@dataclass
class LaunchConfig:
    """Distributed set-up and fault tolerance on a cluster (rcm/launch, slurm/, configs/hydra/launcher/)."""

    collective_timeout_minutes: float = 30.0  # a collective waiting longer fails (a rank hung or died)
    # Set for NCCL jobs unless already in the environment: the timeout then aborts instead of hanging.
    nccl_env: dict[str, str] = field(
        default_factory=lambda: {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
    )
    stop_check_every: int = 1  # iterations between the all-reduces that agree on a stop signal
    requeue: bool = True  # after the stop checkpoint, requeue the Slurm job (scontrol requeue)
    max_requeues: int = 50  # cap on SLURM_RESTART_COUNT; beyond it the job stops for good
    heartbeat_every_s: float = 30.0  # how often each rank rewrites <run_dir>/heartbeats/rank_N.json
    hang_timeout_minutes: float = 45.0  # no iteration for this long: dump stacks, exit 1 (0 disables)
    # <run_dir>/LEASE (rcm/launch/lease.py): a lease whose heartbeat is this old is taken over by a new run
    lease_timeout_minutes: float = 10.0


@dataclass
class LoggingConfig:
    """Where metrics go and what is watched while training (rcm/observe, README "Watching a run")."""

    backends: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (always written), tensorboard, wandb
    dir: Optional[str] = None  # TensorBoard's and W&B's files go under this directory (default: run_dir)
    wandb_project: str = "rcm"
    telemetry_every: int = 100  # iterations between NVML readings of each rank's GPU (0: off)
    cpu_affinity: bool = True  # on GPU nodes, pin each rank to the CPU cores NVML names near its GPU
    straggler_every: int = 100  # iterations between the all-gathers of per-rank step times (0: off)
    straggler_factor: float = 1.5  # a rank whose step phase takes this many times the median is named


@dataclass
class ParallelConfig:
    """The device mesh (dp_replicate × dp_shard × cp = processes) and how the networks are sharded (rcm/parallel)."""

    dp_replicate: int = 1  # HSDP replicas (gradient all-reduce between them)
    dp_shard: int = -1  # FSDP2 shard size over data; -1: the processes the other sizes leave
    cp: int = 1  # Ulysses context parallelism: ranks splitting one sample's tokens (divides num_heads)
    compile: bool = False  # torch.compile each block (fuses Wan's float32 elementwise work; first steps compile)
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager traces without generating kernels (tests)
    activation_checkpointing_every: int = 0  # 0: off; k: checkpoint every k-th block (1: all)
    # block: recompute whole blocks (the 1.3B recipe); mm_only: keep matmul outputs, recompute the rest (14B)
    activation_checkpointing: str = "block"
    grad_accumulation: int = 1  # micro-batches per step; train.batch_size is split into them
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (less memory, one more all-gather)
    param_dtype: str = "bfloat16"  # FSDP2 mixed precision, CUDA only: weights all-gathered and used in this dtype
    reduce_dtype: str = "float32"  # FSDP2 mixed precision, CUDA only: gradients reduced in this dtype


@dataclass
class RCMConfig:
    """The whole tree."""

    name: str = "run"
    run_dir: str = "runs/${name}"
    model: WanDiTConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can extend it (typos fail at composition)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rcm_schema", node=RCMConfig)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key."""


def check_known_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Reject keys the schema does not define (Hydra's `+key=value` would otherwise slip them in)."""
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys here: {', '.join(sorted(known))})")
        child_type = hints.get(key)
        if dataclasses.is_dataclass(child_type) and OmegaConf.is_dict(node[key]):
            check_known_keys(node[key], child_type, f"{prefix}{key}.")


def validate_config(cfg: Any) -> None:
    """Cross-field checks that a schema cannot express; raises ConfigError with one sentence."""
    if OmegaConf.is_config(cfg):
        check_known_keys(cfg, RCMConfig)
    distill, train, data = cfg.distill, cfg.train, cfg.data
    if distill.method not in METHODS:
        raise ConfigError(f"distill.method must be one of {', '.join(METHODS)}, got '{distill.method}'")
    if distill.method != "flow_matching" and not distill.teacher_checkpoint:
        raise ConfigError(f"distill.teacher_checkpoint is required for method '{distill.method}'")
    _validate_distill(distill)
    if uses_guidance(distill.guidance_scale) and not data.negative_embedding:
        raise ConfigError("data.negative_embedding is required when distill.guidance_scale > 1 (CFG's unconditional branch)")
    if len(data.latent_shape) != 4:
        raise ConfigError(f"data.latent_shape must be [C, T, H, W], got {list(data.latent_shape)}")
    if data.latent_shape[0] != cfg.model.in_channels:
        raise ConfigError(
            f"data.latent_shape has {data.latent_shape[0]} channels but model.in_channels is {cfg.model.in_channels}"
        )
    for axis, (size, patch) in enumerate(zip(data.latent_shape[1:], cfg.model.patch_size)):
        if size % patch:
            raise ConfigError(f"data.latent_shape[{axis + 1}]={size} is not divisible by model.patch_size {list(cfg.model.patch_size)}")
    if train.batch_size < 1 or train.max_iters < 1:
        raise ConfigError("train.batch_size and train.max_iters must be positive")
    if train.mixed_precision not in ("bf16", "none"):
        raise ConfigError(f"train.mixed_precision must be 'bf16' or 'none', got '{train.mixed_precision}'")
    _validate_checkpointing(train)
    _validate_sampling(train, data, distill.method)
    if train.max_skipped_updates < 0 or train.skipped_updates_window < 1:
        raise ConfigError("train.max_skipped_updates must be at least 0 and train.skipped_updates_window at least 1")
    if (optim := _optional_section(cfg, "optim")) is not None:
        _validate_optim(optim)
    if (launch := _optional_section(cfg, "launch")) is not None:
        _validate_launch(launch)
    if (logging_section := _optional_section(cfg, "logging")) is not None:
        _validate_logging(logging_section)
    if (parallel := _optional_section(cfg, "parallel")) is not None:
        _validate_parallel(parallel, cfg.model, data.latent_shape, train.batch_size)
    for key in ("scm_time", "dmd_time", "flow_matching_time"):
        as_time_sampler_config(distill[key])


def _validate_distill(distill: Any) -> None:
    if distill.student_update_freq < 1:
        raise ConfigError("distill.student_update_freq must be at least 1")
    if distill.tangent_warmup < 0:
        raise ConfigError(f"distill.tangent_warmup must be at least 0 (0: no warmup), got {distill.tangent_warmup}")
    try:
        check_guidance_scale(distill.guidance_scale, "distill.guidance_scale")
        check_skip_interval(distill.dcm_skip_interval, distill.dcm_num_steps)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not distill.sample_sigma_max > 0:
        raise ConfigError(f"distill.sample_sigma_max must be positive, got {distill.sample_sigma_max}")
    if distill.dcm_num_steps < 2:
        raise ConfigError(f"distill.dcm_num_steps must be at least 2, got {distill.dcm_num_steps}")
    most = len(FIXED_INTERMEDIATE_TIMES) + 1 if distill.dmd_fix_timesteps else None
    if distill.max_simulation_steps < 1 or (most and distill.max_simulation_steps > most):
        raise ConfigError(f"distill.max_simulation_steps must be at least 1{f' and at most {most} with distill.dmd_fix_timesteps' if most else ''}, "
                          f"got {distill.max_simulation_steps}")


def _optional_section(cfg: Any, name: str) -> Any:
    """The config section ``name`` of an OmegaConf config or a plain object, None where it has none."""
    return cfg.get(name) if OmegaConf.is_config(cfg) else getattr(cfg, name, None)


def _validate_checkpointing(train: Any) -> None:
    if train.save_every < 1 or train.keep_last < 1 or train.keep_every < 0:
        raise ConfigError("train.save_every and train.keep_last must be at least 1, train.keep_every at least 0")
    if train.async_save_mode not in ASYNC_MODES:
        raise ConfigError(f"train.async_save_mode must be 'thread' or 'process', got {train.async_save_mode!r}")
    if train.resume_weights_only and not train.resume_from:
        raise ConfigError("train.resume_weights_only needs train.resume_from (the checkpoint to take the weights from)")
    if train.resume_from and str(train.resume_from).endswith((".pth", ".pt")) and not train.resume_weights_only:
        raise ConfigError(f"train.resume_from={train.resume_from} is a weights file: set train.resume_weights_only=true "
                          "(the full training state is only in DCP checkpoints)")


def _validate_sampling(train: Any, data: Any, method: str) -> None:
    every = getattr(train, "sample_every", None)
    if every is None:
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"train.sample_every must be a positive whole number of iterations (or null: no samples), got {every!r}")
    if method == "flow_matching":
        raise ConfigError("train.sample_every draws a distilled student's 1/2/4-step samples; teacher pretraining "
                          "(distill.method=flow_matching) has none: leave it null and use rcm.evaluate --teacher-steps")
    if not data.ground_truth:
        raise ConfigError("train.sample_every draws toy samples and needs data.ground_truth (the toy data's "
                          "ground_truth.pt); samples of Wan runs are not drawn during training yet")


LR_DECAYS = ("none", "linear", "cosine")


def _validate_optim(optim: Any) -> None:
    if optim.decay not in LR_DECAYS:
        raise ConfigError(f"optim.decay must be one of {', '.join(LR_DECAYS)}, got {optim.decay!r}")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (the fraction of the learning rate the decay ends at), "
                          f"got {optim.min_lr_ratio}")
    if optim.warmup_iters < 0:
        raise ConfigError(f"optim.warmup_iters must be at least 0, got {optim.warmup_iters}")


def _validate_logging(section: Any) -> None:
    for key in ("telemetry_every", "straggler_every"):
        value = section[key] if OmegaConf.is_config(section) else getattr(section, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"logging.{key} must be a whole number of iterations, at least 0 (0: off), got {value!r}")
    if not section.straggler_factor > 1:
        raise ConfigError(f"logging.straggler_factor must be more than 1 (times the median step), got {section.straggler_factor}")
    try:
        check_backends(list(section.backends))
        if section.dir and set(section.backends) - {"jsonl"}:
            check_writable_directory(section.dir, "logging.dir")
    except UserError as error:
        raise ConfigError(str(error)) from None


def _validate_launch(launch: Any) -> None:
    if launch.collective_timeout_minutes <= 0:
        raise ConfigError("launch.collective_timeout_minutes must be positive")
    if launch.stop_check_every < 1 or launch.max_requeues < 0 or launch.heartbeat_every_s < 0:
        raise ConfigError("launch.stop_check_every must be >= 1, launch.max_requeues and launch.heartbeat_every_s >= 0")
    if launch.lease_timeout_minutes * 60 <= 2 * launch.heartbeat_every_s:
        raise ConfigError(f"launch.lease_timeout_minutes ({launch.lease_timeout_minutes}) must be longer than two "
                          f"heartbeats (launch.heartbeat_every_s={launch.heartbeat_every_s}), or a live run's lease "
                          "looks stale between its refreshes")
    if 0 < launch.hang_timeout_minutes <= launch.collective_timeout_minutes:
        raise ConfigError(
            f"launch.hang_timeout_minutes ({launch.hang_timeout_minutes}) must exceed launch.collective_timeout_minutes "
            f"({launch.collective_timeout_minutes}) or be 0: a rank waiting in a collective for a hung peer "
            "must see the collective fail before its own watchdog fires"
        )


def _validate_parallel(parallel: Any, model: Any, latent_shape: Any, batch_size: int) -> None:
    tokens = 1
    for size, patch in zip(list(latent_shape)[1:], model.patch_size):
        tokens *= size // patch
    problems = parallel_config_problems(parallel, num_heads=model.num_heads, num_tokens=tokens)
    if not problems and batch_size % parallel.grad_accumulation:
        problems.append(f"train.batch_size={batch_size} must be divisible by parallel.grad_accumulation="
                        f"{parallel.grad_accumulation} (each micro-batch gets batch_size/grad_accumulation samples).")
    if problems:
        raise ConfigError(" ".join(problems))


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> Any:
    """Compose the Hydra config tree outside a Hydra app (demo, tests, notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    validate_config(cfg)
    return cfg


def model_presets() -> list[str]:
    """Names of the model presets (configs/model/NAME.yaml)."""
    return sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))


def load_model_preset(name: str) -> Any:
    """The DiT fields of configs/model/NAME.yaml, typed by the model schema (an unknown key fails)."""
    if name not in model_presets():
        raise ValueError(f"no model preset {name!r}; choose one of {', '.join(model_presets())} (configs/model/NAME.yaml)")
    # Read on its own: composing the whole training config would also check the default data (the toy's
    # latent shape) against this model and reject every Wan preset.
    return OmegaConf.merge(OmegaConf.structured(WanDiTConfig), OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"))


def json_argument(text: str) -> Any:
    """argparse ``type=`` for a JSON value: the parsed value, or a usage error naming the JSON problem."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None


def config_from_json(config_class: type, fields: Any, flag: str) -> Any:
    """The dataclass ``config_class`` built from a JSON object of its fields given to ``flag`` (None: None)."""
    if fields is None:
        return None
    known = {f.name for f in dataclasses.fields(config_class)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise ValueError(f"{flag} must be a JSON object with keys among {sorted(known)}, got {fields!r}")
    return config_class(**fields)
