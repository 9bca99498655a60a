"""The GPU benchmarks' --smoke modes run end to end on the CPU and print their tables, so a change that breaks a
benchmark script fails here rather than on a GPU session's limited device time."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script,extra,table_row", [
    ("bench/generation.py", [], "| **total** |"),
    ("bench/scm_step.py", [], "| eager: fused / two-pass explicit |"),
])
def test_benchmark_smoke_prints_its_table(script, extra, table_row):
    result = run([script, "--smoke", *extra])
    assert result.returncode == 0, result.stderr[-2000:]
    assert table_row in result.stdout


def test_async_save_benchmark_smoke_reports_both_saves(tmp_path):
    result = run(["bench/async_save.py", "--smoke", "--dir", str(tmp_path / "ckpt")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"sync"' in result.stdout and '"stall_ratio_thread_steady"' in result.stdout


def test_parallel_step_benchmark_smoke_with_context_parallelism(tmp_path):
    """Also the whole train state's DCP save and resume: the resume must bring back the changed weights."""
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "bench/parallel_step.py",
                  "--smoke", "--cp", "2", "--dcp-dir", str(tmp_path / "ckpt")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 2 | 1 × 1 × 2 |" in result.stdout
    assert "weights restored: True" in result.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_000000001"]


def test_vae_decode_benchmark_refuses_an_unknown_variant():
    result = run(["bench/vae_decode.py", "--compile", "--variants", "taps_all@3", "fastest@2"])
    assert result.returncode == 2
    assert "'fastest@2': expected one of eager, compiled, taps96" in result.stderr
