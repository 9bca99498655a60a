"""Fuzzing checkpoint damage: flip one random bit in a random place of every file of a run's latest checkpoint
(seeded, a bounded number of trials) and load it the way resume and every consumer do. The property: the loaded
state equals the original, or resume falls back to the previous checkpoint with a warning naming the damaged one,
or the load fails with an error naming the checkpoint — never silently different weights."""
from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from rcm.checkpoint.manager import CheckpointManager
from rcm.checkpoint.weights import load_model_weights
from rcm.cli_errors import UserError

# A deeper hunt: RCM_FUZZ_TRIALS=2000 RCM_FUZZ_SEED=7 pytest tests/checkpoint/test_fuzz.py
TRIALS_PER_FILE = int(os.environ.get("RCM_FUZZ_TRIALS", "60"))
SEED = int(os.environ.get("RCM_FUZZ_SEED", "22"))


def linear_state(seed: int) -> tuple[dict, dict]:
    """(DCP state, rank state) of a run whose networks are a 6→5 nn.Linear (student and EMA) with an optimizer."""
    g = torch.Generator().manual_seed(seed)
    student = {"weight": torch.randn(5, 6, generator=g), "bias": torch.randn(5, generator=g)}
    ema = {name: value + 0.5 for name, value in student.items()}
    optim = {"state": {"weight": {"exp_avg": torch.randn(5, 6, generator=g), "step": torch.tensor(float(seed))}},
             "param_groups": [{"lr": 1e-4, "params": ["weight"]}]}
    rank = {"iteration": seed, "generator": torch.Generator().manual_seed(seed).get_state(), "loader": {"epoch": seed}}
    return {"student": student, "ema": ema, "optim_student": optim}, rank


def empty_like(tree):
    if isinstance(tree, dict):
        return {key: empty_like(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [empty_like(value) for value in tree]
    return torch.full_like(tree, float("nan")) if torch.is_tensor(tree) and tree.is_floating_point() else tree


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run directory with intact checkpoints at iterations 1 and 2."""
    run = tmp_path_factory.mktemp("pristine_run")
    manager = CheckpointManager(run / "checkpoints", keep_last=5)
    for iteration in (1, 2):
        state, rank = linear_state(iteration)
        manager.save(iteration, state, rank, wait=True)
    return run


def flip_random_bit(file: Path, rng: random.Random) -> str:
    """Flip one bit at a random byte of ``file``; returns where, for the failure message."""
    data = bytearray(file.read_bytes())
    position, bit = rng.randrange(len(data)), rng.randrange(8)
    data[position] ^= 1 << bit
    file.write_bytes(bytes(data))
    return f"{file.name} byte {position} bit {bit}"


def resume_outcome(run: Path, damaged: str, caplog) -> str:
    """Resume's view: 'equal', 'fallback' (with a warning naming the damaged checkpoint) or 'error' (naming it)."""
    manager = CheckpointManager(run / "checkpoints")
    newest = run / "checkpoints/iter_000000002"
    caplog.clear()
    try:
        path = manager.latest_loadable()
        assert path is not None, f"{damaged}: an intact older checkpoint exists, yet nothing was found"
        iteration = int(path.name[-9:])
        original, original_rank = linear_state(iteration)
        state = empty_like(original)
        rank = manager.load(path, state)
    except (UserError, KeyError) as error:
        assert str(newest) in str(error), f"{damaged}: the error does not name the checkpoint: {error}"
        return "error"
    assert same(state, original), f"{damaged}: the loaded state differs from what was saved at iteration {iteration}"
    assert same(rank, original_rank), f"{damaged}: the loaded rank state differs from the saved one"
    if iteration == 1:
        assert str(newest) in caplog.text, f"{damaged}: fell back without a warning naming {newest}"
        return "fallback"
    return "equal"


def consumer_outcome(run: Path, damaged: str, caplog) -> str:
    """generate/evaluate's view (load_model_weights of a run directory's EMA): same property."""
    model = nn.Linear(6, 5)
    caplog.clear()
    try:
        load_model_weights(model, run, prefer="ema")
    except (UserError, KeyError, ValueError, FileNotFoundError) as error:
        assert str(run) in str(error), f"{damaged}: the consumer's error does not name the checkpoint: {error}"
        return "error"
    loaded = {name: value.detach() for name, value in model.state_dict().items()}
    if same(loaded, linear_state(2)[0]["ema"]):
        return "equal"
    assert same(loaded, linear_state(1)[0]["ema"]), f"{damaged}: the consumer loaded silently different weights"
    assert "iter_000000002" in caplog.text, f"{damaged}: the consumer fell back without a warning"
    return "fallback"


def test_random_bit_flips_never_load_silently_different_weights(pristine, tmp_path, caplog):
    """TRIALS_PER_FILE seeded flips in each file of the newest checkpoint (shard, .metadata, rank file, marker)."""
    rng = random.Random(SEED)
    files = sorted(p.name for p in (pristine / "checkpoints/iter_000000002").iterdir())
    assert {".metadata", "COMPLETE", "rank_00000.pt"} <= set(files) and any(f.endswith(".distcp") for f in files)
    outcomes: Counter = Counter()
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        for trial in range(TRIALS_PER_FILE * len(files)):
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(pristine, run)
            name = files[trial % len(files)]
            damaged = flip_random_bit(run / "checkpoints/iter_000000002" / name, rng)
            check = resume_outcome if trial % 2 == 0 else consumer_outcome
            outcomes[(name, check(run, damaged, caplog))] += 1
    # The flips were real damage: most of them are caught (a few land in bytes nothing reads, e.g. a timestamp).
    caught = sum(count for (_, outcome), count in outcomes.items() if outcome != "equal")
    assert caught > 0.6 * sum(outcomes.values()), outcomes
