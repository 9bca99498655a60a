"""Mesh sizes and parallel settings are validated before any process group exists, one sentence per problem."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rcm.config import ConfigError, load_config
from rcm.parallel.context_parallel import ContextParallelTokens
from rcm.parallel.mesh import ParallelConfigError, ParallelDims, build_device_mesh, parallel_config_problems, resolve_parallel_dims
from rcm.parallel.parallelize import parallelize_wan_dit
from tests.helpers import tiny_dit


def _config(**overrides):
    values = dict(dp_replicate=1, dp_shard=-1, cp=1, compile=False, activation_checkpointing_every=0, grad_accumulation=1,
                  reshard_after_forward=True, param_dtype="bfloat16", reduce_dtype="float32")
    return SimpleNamespace(**{**values, **overrides})


def test_dp_shard_minus_one_takes_the_remaining_processes():
    assert resolve_parallel_dims(_config(dp_replicate=2, cp=2), 16) == ParallelDims(dp_replicate=2, dp_shard=4, cp=2)
    dims = resolve_parallel_dims(_config(dp_shard=2, cp=2), 4)
    assert (dims.data_parallel_size, dims.fsdp_shard_size, dims.world_size) == (2, 4, 4)


def test_mesh_product_must_equal_the_world_size():
    with pytest.raises(ParallelConfigError, match=r"2×2×2 = 8 but the job has 4 processes"):
        resolve_parallel_dims(_config(dp_replicate=2, dp_shard=2, cp=2), 4)
    with pytest.raises(ParallelConfigError, match=r"does not divide the 6 processes"):
        resolve_parallel_dims(_config(cp=4), 6)


def test_cp_must_divide_heads_and_tokens():
    problems = parallel_config_problems(_config(cp=4), num_heads=12, num_tokens=30)
    assert problems == [
        "parallel.cp=4 must divide the 30 video tokens of data.latent_shape (each rank holds num_tokens/cp of them); "
        "choose a latent size or a cp that divides it."]
    assert "must divide the model's 12 attention heads" in parallel_config_problems(_config(cp=8), num_heads=12)[0]
    with pytest.raises(ParallelConfigError, match="must divide the model's 2 attention heads"):
        build_device_mesh(_config(cp=4), 4, "cpu", num_heads=2)


def test_each_bad_value_gets_its_own_sentence():
    problems = parallel_config_problems(_config(dp_replicate=0, dp_shard=-2, activation_checkpointing_every=-1,
                                                param_dtype="float16"))
    assert len(problems) == 4 and all(p.startswith("parallel.") and p.endswith(".") for p in problems)


def test_an_unknown_compile_backend_is_refused_only_when_compiling():
    assert parallel_config_problems(_config(compile=False, compile_backend="inductr")) == []
    assert parallel_config_problems(_config(compile=True, compile_backend="aot_eager")) == []
    (problem,) = parallel_config_problems(_config(compile=True, compile_backend="inductr"))
    assert problem.startswith("parallel.compile_backend must be a torch.compile backend (") and "inductor" in problem
    with pytest.raises(ConfigError, match="parallel.compile_backend must be"):
        load_config(["experiment=toy_rcm", "distill.teacher_checkpoint=x", "parallel.compile=true",
                     "parallel.compile_backend=inductr"])


def test_one_process_needs_no_mesh():
    assert build_device_mesh(_config(), 1, "cpu") is None


def test_config_rejects_an_impossible_parallel_section():
    with pytest.raises(ConfigError, match="parallel.cp=8 must divide the model's 4 attention heads"):
        load_config(["experiment=toy_rcm", "distill.teacher_checkpoint=x", "parallel.cp=8"])


def test_uneven_token_split_is_refused_with_a_clear_error():
    tokens = ContextParallelTokens(group=None, size=2, rank=1)
    assert torch.equal(tokens.shard(torch.arange(8.0).view(1, 8, 1), dim=1).flatten(), torch.arange(4.0, 8.0))
    with pytest.raises(ValueError, match=r"splits the video's 9 tokens .* over cp=2 ranks"):
        tokens.shard(torch.zeros(1, 9, 4), dim=1)


def test_frozen_network_must_not_require_gradients():
    with pytest.raises(ValueError, match="requires_grad_"):
        parallelize_wan_dit(tiny_dit(0), None, _config(), frozen=True)


def test_one_process_gets_only_activation_checkpointing():
    model = parallelize_wan_dit(tiny_dit(0, num_layers=3), None, _config(activation_checkpointing_every=2))
    assert [getattr(block, "_rcm_checkpointed", False) for block in model.blocks] == [True, False, True]
    teacher = parallelize_wan_dit(tiny_dit(0, num_layers=2).requires_grad_(False), None,
                                  _config(activation_checkpointing_every=1), frozen=True)
    assert not any(getattr(block, "_rcm_checkpointed", False) for block in teacher.blocks)


def test_more_tasks_per_node_than_gpus_is_one_sentence(monkeypatch):
    """A job starting more tasks on a node than it has GPUs stops before training with one sentence (a UserError,
    which rcm.train prints without a traceback) naming the local rank and the visible GPUs."""
    import pytest
    import torch

    from rcm.cli_errors import UserError
    from rcm.parallel.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match="local rank 5 has no GPU of its own: only 4 are visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="train.device=cpu"):
        resolve_device("cuda")
