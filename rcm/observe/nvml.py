"""NVML (nvidia-ml-py, imported as ``pynvml``) for this process's GPU: loaded once, or None where it is missing
(a CPU machine, CI, a driver without NVML), which is said once in the log."""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("rcm.observe")
_said_missing = False


def load_nvml() -> Any | None:
    """The initialized ``pynvml`` module, or None (with one log line per process) when it cannot be used."""
    global _said_missing
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as error:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, a driver mismatch...
        if not _said_missing:
            _said_missing = True
            log.info("NVML is not available (%s: %s): no GPU telemetry or CPU affinity from it",
                     type(error).__name__, error)
        return None


def nvml_handle(nvml: Any, local_index: int) -> Any:
    """The NVML handle of CUDA device ``local_index`` of this process: NVML counts every GPU of the node, so the
    index goes through ``CUDA_VISIBLE_DEVICES`` (indices or GPU-/MIG- UUIDs) when that is set."""
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if local_index < len(visible):
        entry = visible[local_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(local_index)


def nvml_error(nvml: Any) -> type[BaseException]:
    """The exception class NVML calls raise (a query the device does not support, for one)."""
    return getattr(nvml, "NVMLError", Exception)
