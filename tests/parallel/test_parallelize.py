"""FSDP2 + Ulysses context parallelism on CPU (gloo, 2 and 4 processes) give the single-process losses,
tangents and gradients, with and without activation checkpointing and gradient accumulation."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.parallel.workers import run_reference, worker_main

# name -> scenario; every scenario of one world size runs in the same spawned processes
SCENARIOS = {
    2: {
        "fsdp2_student": dict(dp_shard=2, step="student"),
        "fsdp2_fake_score": dict(dp_shard=2, step="fake_score"),
        "cp2_student": dict(cp=2, step="student"),
        "cp2_fake_score": dict(cp=2, step="fake_score"),
        "cp2_jvp": dict(cp=2, step="jvp"),
        "fsdp2_checkpointed_accumulated": dict(dp_shard=2, ac_every=1, grad_accumulation=2, step="student"),
        "cp2_checkpointed": dict(cp=2, ac_every=1, step="student", reshard_after_forward=False),
        "cp2_compiled_checkpointed": dict(cp=2, ac_every=1, compile=True, step="student"),
    },
    4: {
        "fsdp2_cp2_student": dict(dp_shard=2, cp=2, step="student"),
        "fsdp2_cp2_fake_score": dict(dp_shard=2, cp=2, step="fake_score"),
        "fsdp2_cp2_jvp": dict(dp_shard=2, cp=2, step="jvp"),
        "hsdp2_cp2_checkpointed_accumulated": dict(dp_replicate=2, cp=2, ac_every=2, grad_accumulation=2, step="student"),
    },
}
WORLD_SIZE = {name: world for world, scenarios in SCENARIOS.items() for name in scenarios}
RTOL = 1e-5

_spawned: dict[int, object] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    """Run the scenarios of a world size in spawned processes once; returns a loader of rank results."""

    def results(name: str) -> list[dict]:
        world = WORLD_SIZE[name]
        if world not in _spawned:
            out_dir = tmp_path_factory.mktemp(f"world{world}")
            mp.spawn(worker_main, args=(world, _free_port(), SCENARIOS[world], str(out_dir)), nprocs=world, join=True)
            _spawned[world] = out_dir
        return [torch.load(_spawned[world] / f"{name}.rank{rank}.pt") for rank in range(world)]

    return results


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # rtol per element, with an absolute floor at rtol of the tensor's largest entry: float32 sums in another
    # order differ by ~1e-7 of the largest term, which is not small relative to entries near zero.
    atol = RTOL * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(WORLD_SIZE))
def test_parallel_step_matches_single_process(parallel_run, name):
    """Every rank's loss (or output and tangent) and the whole gradient equal the single-process run's."""
    spec = SCENARIOS[WORLD_SIZE[name]][name]
    reference = run_reference(spec)
    for rank, result in enumerate(parallel_run(name)):
        expected = reference["per_rank"][result["dp_rank"]]
        assert (result["compiled_graphs"] > 0) == spec.get("compile", False), result["compiled_graphs"]
        if spec["step"] == "jvp":
            _assert_close(result["out"], expected["out"], f"rank {rank} output")
            _assert_close(result["tangent"], expected["tangent"], f"rank {rank} tangent")
        else:
            torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0)
        assert result["grads"].keys() == reference["grads"].keys()
        for parameter, grad in reference["grads"].items():
            assert grad.abs().max() > 0, f"{parameter} has no gradient in the reference: the test would be vacuous"
            _assert_close(result["grads"][parameter], grad, f"rank {rank} gradient of {parameter}")


def test_networks_are_sharded_and_the_teacher_is_frozen(parallel_run):
    """Under FSDP2 every parameter of the student, fake score and teacher is a shard; the teacher has no gradients."""
    for name in ("fsdp2_fake_score", "fsdp2_cp2_student"):
        for result in parallel_run(name):
            assert all(result["sharding"].values()), result["sharding"]
