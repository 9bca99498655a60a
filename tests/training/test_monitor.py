"""The loop's reports end to end on CPU: step times, throughput, learning rates and skipped updates in every
backend; a requeued run that logged past its last checkpoint has each iteration once."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rcm.parallel.distributed import DistributedInfo
from rcm.train import Trainer
from rcm.training.monitor import tokens_per_sample
from tests.observe.test_backends import tensorboard_steps
from tests.test_train import rcm_config


def test_a_requeued_run_reports_step_metrics_once_per_iteration_in_jsonl_and_tensorboard(toy_setup, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    extra = ["train.log_every=1", "train.keep_last=2", "train.save_every=2", "logging.backends=[jsonl,tensorboard]"]
    Trainer(rcm_config(toy_setup, run_dir, 3, extra), torch.device("cpu"), DistributedInfo()).run()
    # The launch logged 3 iterations; its checkpoint of iteration 3 is lost, as if it died before writing it.
    shutil.rmtree(run_dir / "checkpoints" / "iter_000000003")
    resumed = Trainer(rcm_config(toy_setup, run_dir, 4, extra), torch.device("cpu"), DistributedInfo())
    resumed.run()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4]
    assert tensorboard_steps(run_dir / "tensorboard", "time/step_s") == [1, 2, 3, 4]
    last = lines[-1]
    phases = [last[f"time/{phase}_s"] for phase in ("data", "forward_backward", "optimizer", "checkpoint")]
    assert all(value >= 0 for value in phases) and last["time/forward_backward_s"] > 0
    assert sum(phases) <= last["time/step_s"] * 1.01
    assert last["time/checkpoint_s"] > 0  # iteration 4 is the final save: the loop waits for it
    samples_per_s = 2 / last["time/step_s"]  # train.batch_size=2 on one rank
    assert last["throughput/samples_per_s"] == pytest.approx(samples_per_s)
    assert last["throughput/tokens_per_s"] == pytest.approx(samples_per_s * tokens_per_sample(resumed.cfg))
    assert last["lr/student"] > 0 and "lr/fake_score" in last and last["skipped_updates"] == 0
    assert "throughput/mfu" not in last and not any(key.startswith(("memory/", "gpu/")) for key in last)  # a CPU run
    # The losses and gradient norms are logged as before.
    assert lines[0]["role"] == "student" and "grad_norm/student" in lines[0]
    assert any(key.startswith("loss/") for key in lines[0])
