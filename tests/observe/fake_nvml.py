"""A stand-in for nvidia-ml-py (``pynvml``) with the functions and constants rcm.observe calls, and GPUs whose
readings a test sets."""
from __future__ import annotations

import types
from dataclasses import dataclass, field


class NVMLError(Exception):
    """pynvml's base exception (NVMLError_NotSupported and the others derive from it)."""


@dataclass
class FakeGpu:
    """One GPU's state, in NVML's units (bytes, MHz, milliwatts, °C)."""

    memory_used: int = 10 * 2**30
    memory_total: int = 80 * 2**30
    utilization: int = 97
    sm_clock: int = 1980
    sm_clock_max: int = 1980
    power_mw: int = 650_000
    power_limit_mw: int = 700_000
    temperature: int = 60
    throttle_reasons: int = 0
    ecc_uncorrected: int | None = 0  # None: the device has no ECC (NotSupported)
    ecc_corrected: int | None = 3
    retired_pages_pending: int = 0
    cpu_affinity: list[int] = field(default_factory=lambda: [0b1])  # 64-bit words of the ideal CPU mask


def fake_nvml(gpus: list[FakeGpu]) -> types.ModuleType:
    """A ``pynvml``-like module over ``gpus`` (NVML indices 0..n-1; UUIDs GPU-<index>)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_SM, nvml.NVML_TEMPERATURE_GPU = 1, 0
    nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
    nvml.NVML_VOLATILE_ECC, nvml.NVML_FEATURE_ENABLED = 0, 1
    nvml.initialized = False

    def init():
        nvml.initialized = True

    def gpu(handle) -> FakeGpu:
        assert nvml.initialized, "an NVML call before nvmlInit"
        return gpus[handle]

    def ecc(handle, kind, counter):
        assert counter == nvml.NVML_VOLATILE_ECC
        count = gpu(handle).ecc_uncorrected if kind == 1 else gpu(handle).ecc_corrected
        if count is None:
            raise NVMLError("Not Supported")
        return count

    def cpu_affinity(handle, cpu_set_size):
        words = gpu(handle).cpu_affinity
        return (words + [0] * cpu_set_size)[:cpu_set_size]

    def by_uuid(uuid):
        return int(uuid.removeprefix("GPU-"))

    functions = {
        "nvmlInit": init,
        "nvmlDeviceGetHandleByIndex": lambda index: index,
        "nvmlDeviceGetHandleByUUID": by_uuid,
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(used=gpu(h).memory_used, total=gpu(h).memory_total,
                                                                    free=gpu(h).memory_total - gpu(h).memory_used),
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=gpu(h).utilization, memory=30),
        "nvmlDeviceGetClockInfo": lambda h, clock: gpu(h).sm_clock,
        "nvmlDeviceGetMaxClockInfo": lambda h, clock: gpu(h).sm_clock_max,
        "nvmlDeviceGetPowerUsage": lambda h: gpu(h).power_mw,
        "nvmlDeviceGetEnforcedPowerLimit": lambda h: gpu(h).power_limit_mw,
        "nvmlDeviceGetTemperature": lambda h, sensor: gpu(h).temperature,
        "nvmlDeviceGetCurrentClocksThrottleReasons": lambda h: gpu(h).throttle_reasons,
        "nvmlDeviceGetTotalEccErrors": ecc,
        "nvmlDeviceGetRetiredPagesPendingStatus": lambda h: gpu(h).retired_pages_pending,
        "nvmlDeviceGetCpuAffinity": cpu_affinity,
    }
    for name, function in functions.items():
        setattr(nvml, name, function)
    return nvml
