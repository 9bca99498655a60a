"""What a run reports while it trains: ``<run_dir>/metrics.jsonl`` (one JSON line per logged iteration, main
rank only) and the progress bar on stderr."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class MetricsLog:
    """The metrics file and the progress bar of one run; a context manager that closes both."""

    def __init__(self, run_dir: str | Path, initial: int, total: int, log_every: int, is_main: bool,
                 progress_bar: bool, name: str):
        self.log_every, self.total = log_every, total
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if is_main else None
        self.progress = _progress(initial, total, enabled=progress_bar and is_main, desc=name)

    def record(self, iteration: int, logs: dict[str, Any]) -> None:
        """One iteration finished: advance the bar; every ``log_every`` iterations and at the end, show the losses
        and append ``logs`` to metrics.jsonl."""
        self.progress.update(1)
        if iteration % self.log_every == 0 or iteration == self.total:
            shown = {k: round(v, 4) for k, v in logs.items() if k.startswith("loss/")}
            self.progress.set_postfix(shown, refresh=False)
            if self.file:
                self.file.write(json.dumps({"iteration": iteration, **logs}) + "\n")
                self.file.flush()

    def close(self) -> None:
        """Close the bar and the file."""
        self.progress.close()
        if self.file:
            self.file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _progress(initial: int, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)
