"""Where an evaluated (or data-generating) network comes from: a training run directory, or a bare
checkpoint (.pth, DCP directory) with a model preset. Weights are loaded only when needed, so a run that
only gathers results never reads a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rcm.checkpoint.layout import NotACheckpointError
from rcm.checkpoint.verify import torch_file_problem
from rcm.checkpoint.weights import is_safetensors, load_model_weights, resolve_checkpoint

RUN_CONFIG_FILE = "config.yaml"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def network_dtype_name(name: str | None, device: torch.device) -> str:
    """``name`` (a key of ``DTYPES``), or by default bfloat16 on CUDA (Wan's inference dtype: half the memory,
    tensor-core speed) and float32 elsewhere."""
    if name is not None:
        return name
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def network_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype of `network_dtype_name`."""
    return DTYPES[network_dtype_name(name, device)]


def load_run_config(run_dir: str | Path) -> Any:
    """The resolved config a training run saved next to its checkpoints."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return OmegaConf.load(path)


def is_run_directory(path: str | Path) -> bool:
    """True for a training run directory (it holds the run's config.yaml)."""
    return (Path(path) / RUN_CONFIG_FILE).is_file()


@dataclass
class NetworkSource:
    """A checkpoint path, the model config to build its network, and the run's config when it is a run directory."""

    path: Path
    model_cfg: Any
    run_cfg: Any | None = None
    # The verified checkpoint `checkpoint()` found; `load` reads it without verifying again (and without a
    # collective: a rank may load on its own, once every rank has called `checkpoint()`).
    resolved: Path | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, model: str | None = None, fallback_model_cfg: Any | None = None) -> NetworkSource:
        """Describe `path`: its model is the preset `model` (configs/model/NAME.yaml) if given, else the run's own
        model, else `fallback_model_cfg`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint or run directory {path} does not exist")
        if path.is_file() and not is_safetensors(path) and torch_file_problem(path):
            raise NotACheckpointError(f"{torch_file_problem(path)}; give a training run directory, a .pth/.pt/"
                                      ".safetensors file or a DCP checkpoint directory")
        run_cfg = load_run_config(path) if is_run_directory(path) else None
        if model is not None:
            from rcm.config import load_model_preset

            model_cfg = load_model_preset(model)
        elif run_cfg is not None:
            model_cfg = run_cfg.model
        elif fallback_model_cfg is not None:
            model_cfg = fallback_model_cfg
        else:
            raise ValueError(f"{path} is not a run directory (no {RUN_CONFIG_FILE}); name its model with --model PRESET")
        return cls(path=path, model_cfg=model_cfg, run_cfg=run_cfg)

    def run_setting(self, dotted_key: str, default: Any = None) -> Any:
        """A key of the run's config (e.g. 'distill.guidance_scale'), or `default` without a run config."""
        if self.run_cfg is None:
            return default
        value = OmegaConf.select(self.run_cfg, dotted_key, default=default)
        return default if value is None else value

    def checkpoint(self) -> str:
        """The checkpoint actually read, as an absolute path: verified (a run directory's newest intact one, damaged
        newer ones skipped with a warning). Collective under torch.distributed the first time: call it on every rank."""
        if self.resolved is None:
            self.resolved = resolve_checkpoint(self.path)
        return str(self.resolved.resolve())

    def load(self, weights: str = "ema", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The network with its EMA (or raw student) weights in ``dtype``, in eval mode, without gradients."""
        from rcm.train import build_network

        # Built on the meta device and allocated in place: no random initialization (minutes for 14B on a CPU),
        # which the strict load would overwrite anyway.
        network = build_network(self.model_cfg, device="meta").to(dtype).to_empty(device=device)
        load_model_weights(network, Path(self.checkpoint()), prefer=weights, verify=False)
        return network.eval().requires_grad_(False)


def load_network(run_dir: str | Path, weights: str = "ema", device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The run's network with its EMA (or raw student) weights, in eval mode, and the run's config."""
    run_cfg = load_run_config(run_dir)
    return NetworkSource(Path(run_dir), run_cfg.model, run_cfg).load(weights, device), run_cfg
