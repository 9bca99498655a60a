"""GPU telemetry through NVML: memory, utilisation, SM clock against its maximum, power against its limit,
temperature, throttle reasons, ECC error counts and pending retired pages of one GPU; a warning names the GPU
when its clocks are held down by heat or a hardware slowdown, or when it reports new uncorrectable ECC errors.

A query the device does not support (ECC on a consumer card, retired pages on a card that remaps rows) is left
out of the readings."""
from __future__ import annotations

import logging
from typing import Any

from rcm.observe.nvml import nvml_error

log = logging.getLogger("rcm.observe")
GIB = 2**30

# Throttle reason bits (nvmlClocksThrottleReason*) by name. All are reported; those in WARN_THROTTLE mean the GPU
# runs slower than it should (heat, a hardware fault or power brake) and are named in a warning. The software
# power cap is a normal state of a busy GPU, and idle / application clocks are not a slowdown.
THROTTLE_REASONS = {
    0x1: "idle", 0x2: "application clocks", 0x4: "software power cap", 0x8: "hardware slowdown",
    0x10: "sync boost", 0x20: "software thermal slowdown", 0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}
WARN_THROTTLE = 0x8 | 0x20 | 0x40 | 0x80


def throttle_names(reasons: int) -> list[str]:
    """The names of the bits set in a throttle-reason mask."""
    return [name for bit, name in THROTTLE_REASONS.items() if reasons & bit]


class GpuTelemetry:
    """Reads one GPU through NVML (``nvml``: the pynvml module, ``handle``: its device) and warns about it;
    ``where`` names it in warnings (e.g. "GPU 3 of host n17 (rank 11)")."""

    def __init__(self, nvml: Any, handle: Any, where: str):
        self.nvml, self.handle, self.where = nvml, handle, where
        self.uncorrected_ecc: int | None = None  # the previous reading's count: a rise is a new error
        self.warned_throttle = 0

    def _query(self, function: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, function)(self.handle, *args)
        except nvml_error(self.nvml):
            return None  # not supported by this device or driver

    def read(self) -> dict[str, float]:
        """The readings now, as ``gpu/<name>`` numbers; warns about throttling and new uncorrectable ECC errors."""
        nvml, readings = self.nvml, {}
        memory = self._query("nvmlDeviceGetMemoryInfo")
        if memory is not None:
            readings.update({"memory_used_gib": memory.used / GIB, "memory_total_gib": memory.total / GIB})
        utilization = self._query("nvmlDeviceGetUtilizationRates")
        if utilization is not None:
            readings["utilization_pct"] = utilization.gpu
        sm_clock = self._query("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM)
        sm_clock_max = self._query("nvmlDeviceGetMaxClockInfo", nvml.NVML_CLOCK_SM)
        if sm_clock is not None and sm_clock_max:
            readings.update({"sm_clock_mhz": sm_clock, "sm_clock_max_mhz": sm_clock_max})
        power, limit = self._query("nvmlDeviceGetPowerUsage"), self._query("nvmlDeviceGetEnforcedPowerLimit")
        if power is not None and limit:
            readings.update({"power_w": power / 1000, "power_limit_w": limit / 1000})  # NVML reports milliwatts
        temperature = self._query("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU)
        if temperature is not None:
            readings["temperature_c"] = temperature
        reasons = self._query("nvmlDeviceGetCurrentClocksThrottleReasons")
        if reasons is not None:
            readings["throttle_reasons"] = reasons
            self._check_throttle(int(reasons), readings)
        for kind, key in ((nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "ecc_uncorrected"),
                          (nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "ecc_corrected")):
            count = self._query("nvmlDeviceGetTotalEccErrors", kind, nvml.NVML_VOLATILE_ECC)
            if count is not None:
                readings[key] = count
        pending = self._query("nvmlDeviceGetRetiredPagesPendingStatus")
        if pending is not None:
            readings["retired_pages_pending"] = int(pending == nvml.NVML_FEATURE_ENABLED)
        if "ecc_uncorrected" in readings:
            self._check_ecc(int(readings["ecc_uncorrected"]))
        return {f"gpu/{key}": float(value) for key, value in readings.items()}

    def _check_throttle(self, reasons: int, readings: dict) -> None:
        slowing = reasons & WARN_THROTTLE
        if slowing and slowing != self.warned_throttle:  # once per new set of reasons, not at every reading
            clock = (f" (SM clock {readings['sm_clock_mhz']:.0f} of {readings['sm_clock_max_mhz']:.0f} MHz)"
                     if "sm_clock_mhz" in readings else "")
            log.warning("%s is throttled: %s%s", self.where, ", ".join(throttle_names(slowing)), clock)
        self.warned_throttle = slowing

    def _check_ecc(self, uncorrected: int) -> None:
        if self.uncorrected_ecc is not None and uncorrected > self.uncorrected_ecc:
            log.warning("%s reports %d new uncorrectable ECC error(s) (%d in all since the driver loaded): its memory "
                        "may be failing; drain the node if it repeats", self.where, uncorrected - self.uncorrected_ecc,
                        uncorrected)
        self.uncorrected_ecc = uncorrected
