"""Where logged metrics go: ``metrics.jsonl`` (always), TensorBoard and W&B (``logging.backends``).

Only the main rank writes. A resumed run appends to the same files without duplicating steps: the lines and
events of iterations after the checkpoint it resumed from are dropped (JSON lines rewritten, TensorBoard's
``purge_step``, W&B's run id kept in the run directory). A backend that fails while training (a full disk, a W&B
error) is disabled with one warning; the others, metrics.jsonl included, go on.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import uuid
from numbers import Real
from pathlib import Path
from typing import Any

from rcm.atomic_files import atomic_write_bytes
from rcm.cli_errors import UserError

log = logging.getLogger("rcm.observe")

BACKENDS = ("jsonl", "tensorboard", "wandb")
# The package each optional backend needs, and the extra that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "logging"), "wandb": ("wandb", "wandb")}
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def check_backends(names: list[str], key: str = "logging.backends") -> None:
    """Raise UserError (one sentence naming ``key``) for an unknown backend or one whose package is missing."""
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"{key} has unknown backend {name!r}; choose among {', '.join(BACKENDS)}")
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            package, extra = PACKAGES[name]
            raise UserError(f"{key} asks for {name} but the {package} package is not installed "
                            f"(pip install {package}, or the project's [{extra}] extra)")


def check_writable_directory(directory: str | Path, key: str) -> None:
    """Raise UserError naming ``key`` when ``directory`` cannot be created or written (its nearest existing parent
    is checked, nothing is created)."""
    path = Path(directory).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if existing is not None and not existing.is_dir() else "is not writable"
        raise UserError(f"{key}={directory} cannot be written: {existing} {what}")


def numeric(logs: dict[str, Any]) -> dict[str, float]:
    """The finite-or-not real numbers of ``logs`` (strings and flags such as the role are left out)."""
    return {k: float(v) for k, v in logs.items() if isinstance(v, Real) and not isinstance(v, bool)}


class JsonLinesBackend:
    """``<run_dir>/metrics.jsonl``: one JSON object per logged iteration, ``{"iteration": N, **logs}``."""

    name = "jsonl"

    def __init__(self, run_dir: str | Path, resume_iteration: int):
        self.path = Path(run_dir) / METRICS_FILE
        if self.path.exists():  # a requeued run: drop what the previous launch logged after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if _iteration_of(line) is not None and _iteration_of(line) <= resume_iteration]
            atomic_write_bytes(self.path, "".join(kept).encode())
        self.file = open(self.path, "a")

    def write(self, iteration: int, logs: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        self.file.write(json.dumps({"iteration": iteration, **logs}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _iteration_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash: dropped


class TensorBoardBackend:
    """Scalars (and images) as TensorBoard events under ``<directory>/tensorboard``."""

    name = "tensorboard"

    def __init__(self, directory: str | Path, resume_iteration: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of steps from it on that an earlier launch wrote after its
        # last checkpoint, so the curve has each iteration once.
        self.writer = SummaryWriter(str(Path(directory) / "tensorboard"),
                                    purge_step=resume_iteration + 1 if resume_iteration > 0 else None)

    def write(self, iteration: int, logs: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        for key, value in numeric(logs).items():
            self.writer.add_scalar(key, value, iteration)
        for key, image_HWC in (images or {}).items():
            self.writer.add_image(key, image_HWC, iteration, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A W&B run in ``<directory>/wandb``; its id is kept in ``<directory>/wandb_run_id`` so that a requeued run
    resumes the same W&B run. ``WANDB_MODE=offline`` needs no account (``wandb sync`` uploads it later)."""

    name = "wandb"

    def __init__(self, directory: str | Path, resume_iteration: int, project: str, run_name: str, config: dict):
        import wandb

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.resume_iteration = resume_iteration
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(directory),
                              config=config)

    def write(self, iteration: int, logs: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        import wandb

        record: dict[str, Any] = dict(numeric(logs))
        for key, image_HWC in (images or {}).items():
            record[key] = wandb.Image(image_HWC)
        self.run.log(record, step=iteration)

    def close(self) -> None:
        self.run.finish()


class MetricsBackends:
    """The main rank's backends by name; ``write`` sends one iteration's logs to each, disabling any that fails."""

    def __init__(self, backends: list[Any]):
        self.backends = list(backends)

    def write(self, iteration: int, logs: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Send ``logs`` (and ``images``, HWC uint8 arrays) of ``iteration`` to every backend still working."""
        for backend in list(self.backends):
            try:
                backend.write(iteration, logs, images)
            except Exception as error:  # noqa: BLE001 - no logging failure may stop training
                self._disable(backend, error, iteration)

    def _disable(self, backend: Any, error: Exception, iteration: int) -> None:
        self.backends.remove(backend)
        log.warning("logging backend %s failed at iteration %d and is disabled for the rest of this run (%s: %s); "
                    "the other backends go on", backend.name, iteration, type(error).__name__, error)
        try:
            backend.close()
        except Exception:  # noqa: BLE001 - already broken
            pass

    @property
    def names(self) -> list[str]:
        """The backends still working."""
        return [backend.name for backend in self.backends]

    def close(self) -> None:
        """Close every backend (a failure to close is a warning)."""
        for backend in self.backends:
            try:
                backend.close()
            except Exception as error:  # noqa: BLE001
                log.warning("logging backend %s failed to close (%s)", backend.name, error)
        self.backends = []


def open_backends(names: list[str], run_dir: str | Path, directory: str | Path | None, resume_iteration: int,
                  project: str = "rcm", run_name: str = "run", config: dict | None = None) -> MetricsBackends:
    """The backends ``names`` (metrics.jsonl always) for the main rank of the run in ``run_dir``, resumed at
    ``resume_iteration`` (0: a fresh start); TensorBoard and W&B write under ``directory`` (default ``run_dir``).

    metrics.jsonl failing to open is an error; an optional backend failing to start is disabled with a warning."""
    directory = Path(directory or run_dir)
    backends: list[Any] = [JsonLinesBackend(run_dir, resume_iteration)]
    for name in dict.fromkeys(names):
        try:
            if name == "tensorboard":
                backends.append(TensorBoardBackend(directory, resume_iteration))
            elif name == "wandb":
                backends.append(WandbBackend(directory, resume_iteration, project, run_name, config or {}))
        except Exception as error:  # noqa: BLE001 - a logging backend never stops training
            log.warning("logging backend %s could not start and is disabled for this run (%s: %s); "
                        "metrics.jsonl goes on", name, type(error).__name__, error)
    return MetricsBackends(backends)
