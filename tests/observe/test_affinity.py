"""CPU affinity from NVML's mask (fake NVML): a rank is pinned to the cores near its GPU that it may use, and left
as it is when none of them are."""
from __future__ import annotations

import os

import pytest

from rcm.observe.affinity import gpu_cpu_set, pin_to_gpu_cpus
from tests.forked import run_forked
from tests.observe.fake_nvml import FakeGpu, fake_nvml


def test_the_mask_words_become_core_numbers():
    nvml = fake_nvml([FakeGpu(cpu_affinity=[0b1010, 1 << 63, 0b1])])
    nvml.nvmlInit()
    assert gpu_cpu_set(nvml, 0, cpu_count=130) == {1, 3, 127, 128}


def _pin(allowed: list[int], near_gpu: list[int], results) -> None:
    """In a forked process: this process may use ``allowed`` (as in a Slurm allocation), the GPU is near ``near_gpu``."""
    os.sched_setaffinity(0, allowed)
    words = [0] * (max(near_gpu) // 64 + 1)
    for core in near_gpu:
        words[core // 64] |= 1 << (core % 64)
    nvml = fake_nvml([FakeGpu(), FakeGpu(cpu_affinity=words)])
    nvml.nvmlInit()
    chosen = pin_to_gpu_cpus(nvml, 1, "rank 0")
    results.put((None if chosen is None else sorted(chosen), sorted(os.sched_getaffinity(0))))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPU cores")
def test_a_rank_is_pinned_to_the_cores_near_its_gpu_within_its_allocation():
    """Forked (pinning this process would slow the rest of the suite): of the GPU's cores only those the process
    may use are kept; when it may use none of them its set is left as it is."""
    first, last = sorted(os.sched_getaffinity(0))[0], sorted(os.sched_getaffinity(0))[-1]
    [(chosen, after)] = run_forked(_pin, [([first, last], [last])])
    assert chosen == after == [last]
    [(chosen, after)] = run_forked(_pin, [([last], [first, last])])
    assert chosen == after == [last]
    [(chosen, after)] = run_forked(_pin, [([first], [last])])
    assert chosen is None and after == [first]
