"""GPU telemetry through a fake NVML (the pynvml functions it calls): readings in SI-ish units, a warning naming a
throttled GPU or one with new uncorrectable ECC errors, and one line where NVML is missing; one GPU test reads a
real device."""
from __future__ import annotations

import logging
import sys

import pytest

import rcm.observe.nvml as nvml_module
from rcm.observe.gpu_telemetry import GpuTelemetry, throttle_names
from rcm.observe.nvml import load_nvml, nvml_handle
from tests.observe.fake_nvml import FakeGpu, fake_nvml


def test_readings_of_one_gpu():
    nvml = fake_nvml([FakeGpu(), FakeGpu(temperature=71, ecc_corrected=None)])
    nvml.nvmlInit()
    readings = GpuTelemetry(nvml, 1, "GPU 1").read()
    assert readings == {
        "gpu/memory_used_gib": 10.0, "gpu/memory_total_gib": 80.0, "gpu/utilization_pct": 97.0,
        "gpu/sm_clock_mhz": 1980.0, "gpu/sm_clock_max_mhz": 1980.0, "gpu/power_w": 650.0, "gpu/power_limit_w": 700.0,
        "gpu/temperature_c": 71.0, "gpu/throttle_reasons": 0.0, "gpu/ecc_uncorrected": 0.0,
        "gpu/retired_pages_pending": 0.0,
    }  # the corrected-ECC count the device does not support is left out


def test_a_throttled_gpu_and_new_uncorrectable_ecc_errors_are_named_once(caplog):
    gpu = FakeGpu(ecc_uncorrected=2)
    nvml = fake_nvml([gpu])
    nvml.nvmlInit()
    telemetry = GpuTelemetry(nvml, 0, "GPU 0 of host n7 (rank 3)")
    with caplog.at_level(logging.WARNING, logger="rcm.observe"):
        telemetry.read()  # the first reading is the baseline: 2 old errors are not new
        gpu.throttle_reasons, gpu.sm_clock = 0x4, 1700  # the software power cap of a busy GPU: not a slowdown
        telemetry.read()
        assert caplog.records == []
        gpu.throttle_reasons, gpu.sm_clock = 0x4 | 0x40, 1200
        telemetry.read()
        telemetry.read()  # the same slowdown again: no second warning
        gpu.ecc_uncorrected = 3
        telemetry.read()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "GPU 0 of host n7 (rank 3) is throttled: hardware thermal slowdown (SM clock 1200 of 1980 MHz)",
        "GPU 0 of host n7 (rank 3) reports 1 new uncorrectable ECC error(s) (3 in all since the driver loaded): its "
        "memory may be failing; drain the node if it repeats",
    ]
    assert throttle_names(0x4 | 0x40) == ["software power cap", "hardware thermal slowdown"]


def test_missing_nvml_is_said_once_and_gives_none(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setattr(nvml_module, "_said_missing", False)
    with caplog.at_level(logging.INFO, logger="rcm.observe"):
        assert load_nvml() is None and load_nvml() is None
    assert len(caplog.records) == 1 and "NVML is not available" in caplog.records[0].getMessage()


def test_the_handle_follows_cuda_visible_devices(monkeypatch):
    nvml = fake_nvml([FakeGpu()] * 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    assert nvml_handle(nvml, 1) == 7
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5")
    assert nvml_handle(nvml, 0) == 5
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_handle(nvml, 3) == 3


@pytest.mark.gpu
def test_a_real_gpu_reads_through_nvml():
    import torch

    nvml = load_nvml()
    assert nvml is not None, "nvidia-ml-py is not installed or NVML does not load on this GPU machine"
    readings = GpuTelemetry(nvml, nvml_handle(nvml, torch.cuda.current_device()), "GPU 0").read()
    assert 0 <= readings["gpu/memory_used_gib"] <= readings["gpu/memory_total_gib"]
    assert 0 < readings["gpu/sm_clock_max_mhz"] and 0 < readings["gpu/power_limit_w"] and readings["gpu/temperature_c"] > 0
