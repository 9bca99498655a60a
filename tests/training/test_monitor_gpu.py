"""On one CUDA GPU (run through the device tool): the loop's metrics hold the GPU's NVML readings, CUDA memory and
MFU, the heartbeat holds the readings, and the rank is pinned to the cores NVML names near its GPU."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rcm.launch.heartbeat import Heartbeat, read_heartbeats
from rcm.parallel.distributed import DistributedInfo
from rcm.train import Trainer
from rcm.training.monitor import pin_cpu_affinity
from tests.test_train import rcm_config

pytestmark = pytest.mark.gpu


def test_a_gpu_run_reports_telemetry_memory_and_mfu(toy_setup, tmp_path):
    run_dir = tmp_path / "run"
    cfg = rcm_config(toy_setup, run_dir, 4, ["train.device=cuda", "train.log_every=2", "logging.telemetry_every=2",
                                             "distill.tangent_warmup=0"])
    heartbeat = Heartbeat(run_dir / "heartbeats", 0, every_s=60, hang_timeout_s=0)
    try:
        Trainer(cfg, torch.device("cuda", 0), DistributedInfo()).run(heartbeat=heartbeat)
        heartbeat.write()
    finally:
        heartbeat.close()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["iteration"] == 4
    assert 0 < last["memory/peak_allocated_gib"] <= last["memory/reserved_gib"]
    assert 0 < last["gpu/memory_used_gib"] < last["gpu/memory_total_gib"] and last["gpu/sm_clock_max_mhz"] > 0
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200")):
        assert 0 < last["throughput/mfu"] < 1  # the toy network is tiny: far below 1, but counted
    [record] = read_heartbeats(run_dir / "heartbeats")
    assert record["gpu"]["memory_total_gib"] == last["gpu/memory_total_gib"]


def test_the_rank_is_pinned_to_the_cores_near_its_gpu():
    from rcm.observe.affinity import gpu_cpu_set
    from rcm.observe.nvml import load_nvml, nvml_handle

    before = os.sched_getaffinity(0)
    try:
        cores = pin_cpu_affinity(torch.device("cuda", 0))
        nvml = load_nvml()
        near = gpu_cpu_set(nvml, nvml_handle(nvml, 0))
        print(f"{len(before)} cores allowed, {len(near)} near GPU 0, pinned to {None if cores is None else len(cores)}")
        if near & before:
            assert cores == near & before == os.sched_getaffinity(0)
        else:
            assert cores is None and os.sched_getaffinity(0) == before
    finally:
        os.sched_setaffinity(0, before)
