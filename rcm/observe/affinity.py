"""Pin a rank to the CPU cores near its GPU (the GPU's NUMA node, from NVML's affinity mask), so the data loading
and kernel launches of one GPU do not run on a socket that reaches it only through the inter-socket link."""
from __future__ import annotations

import logging
import os
from typing import Any

from rcm.observe.nvml import nvml_error

log = logging.getLogger("rcm.observe")
BITS_PER_WORD = 64  # nvmlDeviceGetCpuAffinity fills an array of 64-bit words


def gpu_cpu_set(nvml: Any, handle: Any, cpu_count: int | None = None) -> set[int]:
    """The CPU cores NVML names as close to the GPU ``handle`` (its ideal affinity mask)."""
    cpu_count = cpu_count or os.cpu_count() or 1
    words = nvml.nvmlDeviceGetCpuAffinity(handle, (cpu_count + BITS_PER_WORD - 1) // BITS_PER_WORD)
    return {index * BITS_PER_WORD + bit for index, word in enumerate(words) for bit in range(BITS_PER_WORD)
            if int(word) >> bit & 1}


def pin_to_gpu_cpus(nvml: Any, handle: Any, where: str) -> set[int] | None:
    """Restrict this process to the cores near the GPU that are also in its current set (a Slurm allocation may
    hold fewer); returns the new set, or None (left as is, with a log line) when there is nothing to pin to."""
    allowed = os.sched_getaffinity(0)
    try:
        near = gpu_cpu_set(nvml, handle)
    except nvml_error(nvml) as error:
        log.info("%s: NVML gives no CPU affinity (%s); CPU affinity left as is", where, error)
        return None
    chosen = near & allowed
    if not chosen:
        log.info("%s: none of the cores near the GPU (%d) are in this process's set; CPU affinity left as is",
                 where, len(near))
        return None
    os.sched_setaffinity(0, chosen)
    return chosen
