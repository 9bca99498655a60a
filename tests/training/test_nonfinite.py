"""The non-finite budget: poisoned data stops a run with a non-zero exit and a sentence naming its shards and
samples, instead of training to "success" with every update skipped."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm.data.shards import ShardLoader, nonfinite_samples, write_shards
from rcm.training.nonfinite import NonFiniteBudget, NonFiniteBudgetExceeded, StepOutcome
from tests.forked import run_forked

REPO = Path(__file__).resolve().parents[2]
LATENT_SHAPE, TEXT_LEN, TEXT_DIM = (4, 2, 8, 8), 8, 32


def outcome(skipped=False, nonfinite=0, samples=2, shards=("a.tar", "a.tar"), bad=()) -> StepOutcome:
    return StepOutcome(logs={}, update_skipped=skipped, nonfinite_samples=nonfinite, samples=samples,
                       shards=list(shards), bad_inputs=list(bad))


def test_more_than_the_budget_within_the_window_stops_and_spread_out_skips_do_not():
    budget = NonFiniteBudget(max_skipped=2, window=10)
    for iteration in range(0, 40, 5):  # one skip every 5 iterations: at most 2 in any 10
        assert budget.record(iteration, outcome(skipped=True))
    budget = NonFiniteBudget(max_skipped=2, window=10)
    assert budget.record(0, outcome(skipped=True)) and budget.record(4, outcome(skipped=True))
    assert not budget.record(5, outcome())
    with pytest.raises(NonFiniteBudgetExceeded, match=r"3 of the last 10 iterations \(up to iteration 9\).*a\.tar"):
        budget.record(9, outcome(skipped=True))


def test_a_step_whose_every_sample_was_non_finite_counts_as_skipped_a_partial_one_does_not():
    """The loss guards zero non-finite samples, so the update may be finite and still carry nothing."""
    budget = NonFiniteBudget(max_skipped=0, window=10)
    assert not budget.record(0, outcome(nonfinite=1, samples=2))
    with pytest.raises(NonFiniteBudgetExceeded) as stopped:
        budget.record(1, outcome(nonfinite=2, samples=2, shards=("x/shard-000003.tar", "x/shard-000001.tar")))
    message = str(stopped.value)
    assert "\n" not in message and "x/shard-000001.tar, x/shard-000003.tar" in message
    assert "train.max_skipped_updates=0" in message and "held finite values" in message


def test_non_finite_input_is_traced_to_its_shard_and_sample_key(tmp_path):
    samples = [{"latent": torch.zeros(LATENT_SHAPE), "embed": torch.zeros(3, TEXT_DIM), "prompt": f"p{i}"} for i in range(4)]
    samples[2]["latent"][0, 0, 0, 0] = float("nan")
    samples[3]["embed"][1, 5] = float("inf")
    write_shards(samples, tmp_path, samples_per_shard=2)
    batch = next(ShardLoader(tmp_path, 4, LATENT_SHAPE, TEXT_LEN, TEXT_DIM, shuffle_buffer=1))
    first, second = str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")
    assert sorted(zip(batch["key"], batch["shard"])) == [("000000000", first), ("000000001", first),
                                                         ("000000002", second), ("000000003", second)]
    assert sorted(nonfinite_samples(batch)) == [(second, "000000002", "latent"), (second, "000000003", "embed")]


def _rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    budget = NonFiniteBudget(max_skipped=1, window=10, world_size=2)
    try:
        for iteration in range(3):
            # Rank 1's samples are all NaN, rank 0's are fine: half the samples alone do not make a skipped step,
            # so the update's own non-finite gradient (seen by every rank) must be what counts here.
            mine = (outcome(skipped=True, nonfinite=2, shards=["r1.tar"] * 2, bad=[("r1.tar", f"00{iteration}", "latent")])
                    if rank == 1 else outcome(skipped=True, shards=["r0.tar"] * 2))
            budget.record(iteration, mine)
        results.put((rank, "no stop"))
    except NonFiniteBudgetExceeded as error:
        results.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_at_the_same_iteration_naming_every_rank_s_shards(tmp_path):
    answers = dict(run_forked(_rank, [(r, str(tmp_path / "init")) for r in range(2)]))
    assert answers[0] == answers[1], answers
    assert "2 of the last 2 iterations (up to iteration 1)" in answers[0]
    assert "NaN or infinite input in shard r1.tar (samples 000 (latent), 001 (latent))" in answers[0]


def test_all_nan_latents_end_the_run_with_exit_1_naming_the_shards(toy_setup, tmp_path):
    """The issue's drill: with every latent NaN the run used to skip its updates and exit 0. With the default budget
    (10 in 100) it now stops at the 11th skipped update, before any checkpoint, naming the shards and samples."""
    data = tmp_path / "nan_data"
    generator = torch.Generator().manual_seed(0)
    write_shards([{"latent": torch.full(LATENT_SHAPE, float("nan")), "prompt": "a cat",
                   "embed": torch.randn(TEXT_LEN, TEXT_DIM, generator=generator)} for _ in range(16)], data, 8)
    shutil.copy(toy_setup / "data" / "negative_embedding.pt", data)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rcm.train", "experiment=toy_rcm", f"run_dir={run_dir}", f"data.shards={data}",
               f"distill.teacher_checkpoint={toy_setup / 'teacher.pth'}", "train.batch_size=2", "train.max_iters=30",
               "train.save_every=100", "distill.tangent_warmup=2", "distill.student_update_freq=2",
               "train.progress_bar=false", "train.device=cpu", "data.shuffle_buffer=4", "launch.heartbeat_every_s=0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    # sCM's term is NaN on every sample of every student step; DMD and the fake score start from noise and stay
    # finite, so the fake score steps in between still update: 11 skipped among the first 19 iterations.
    assert last.startswith("rcm.train: error: 11 of the last 19 iterations (up to iteration 18) skipped"), last
    assert f"shard {data / 'shard-000000.tar'} (samples 0000000" in last and f"{data / 'shard-000001.tar'}" in last
    assert "(latent)" in last and "train.max_skipped_updates=10" in last
    assert "non-finite values in the latent of sample 0000000" in result.stdout  # the per-batch warning (Hydra logs to stdout)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
