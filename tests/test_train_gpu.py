"""Training on 2 CUDA GPUs with NCCL (run through the device tool): networks built on the meta device, sharded
(FSDP over both GPUs, or FSDP over the CP group with Ulysses CP=2), start exactly from the teacher checkpoint,
then train and checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mesh", [["parallel.dp_shard=2"], ["parallel.cp=2", "parallel.dp_shard=1"]])
def test_two_gpu_training_starts_from_the_teacher(toy_setup, tmp_path, mesh):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "parallel" / "trainer_start_worker.py"), str(toy_setup), str(tmp_path / "run"), *mesh]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")
    assert (tmp_path / "run" / "checkpoints" / "iter_000000004" / "COMPLETE").is_file()
