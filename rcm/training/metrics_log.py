"""What a run reports while it trains: every ``log_every`` iterations its logs go to the main rank's backends
(``<run_dir>/metrics.jsonl`` always, TensorBoard and W&B by ``logging.backends``: rcm/observe/backends.py), and
the progress bar on stderr shows the losses."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rcm.observe.backends import MetricsBackends, open_backends


class MetricsLog:
    """The backends and the progress bar of one run; a context manager that closes both."""

    def __init__(self, run_dir: str | Path, initial: int, total: int, log_every: int, is_main: bool,
                 progress_bar: bool, name: str, backends: list[str] = (), log_dir: str | None = None,
                 project: str = "rcm", config: dict | None = None):
        self.log_every, self.total = log_every, total
        self.backends = (open_backends(list(backends), run_dir, log_dir, initial, project, name, config)
                         if is_main else MetricsBackends([]))
        self.progress = _progress(initial, total, enabled=progress_bar and is_main, desc=name)

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` is one whose logs are written."""
        return iteration % self.log_every == 0 or iteration == self.total

    def record(self, iteration: int, logs: dict[str, Any], images: dict[str, Any] | None = None,
               force: bool = False) -> None:
        """One iteration finished: advance the bar; every ``log_every`` iterations, at the end and with ``force``,
        show the losses and write ``logs`` (and ``images``, HWC uint8) to the backends."""
        self.progress.update(1)
        if self.due(iteration) or force:
            shown = {k: round(v, 4) for k, v in logs.items() if k.startswith("loss/")}
            self.progress.set_postfix(shown, refresh=False)
            self.backends.write(iteration, logs, images)

    def write(self, iteration: int, logs: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Write ``logs`` (and ``images``) of ``iteration`` to the backends now (e.g. before the first step)."""
        self.backends.write(iteration, logs, images)

    def close(self) -> None:
        """Close the bar and the backends."""
        self.progress.close()
        self.backends.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _progress(initial: int, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)
