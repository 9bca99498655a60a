"""Weights of FSDP2-sharded networks on CPU (one gloo rank): the frozen teacher's shards are stored in the dtype
FSDP gathers them in (bf16 on CUDA; here a bf16 policy forced), the same forward for half the memory; and a
sharded network loads a checkpoint tensor by tensor, each rank keeping its slice."""
from __future__ import annotations

import copy
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from rcm.parallel import parallelize as parallelize_module
from rcm.checkpoint.weights import copy_weights, load_model_weights
from rcm.parallel.fsdp import apply_fsdp
from rcm.parallel.mesh import ParallelDims, ParallelMesh
from tests.helpers import LATENT_SHAPE, TINY, tiny_dit

BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
CONFIG = SimpleNamespace(compile=False, activation_checkpointing_every=1, param_dtype="bfloat16",
                         reduce_dtype="float32", reshard_after_forward=True)


@pytest.fixture
def one_rank_mesh():
    """A one-rank gloo mesh; an earlier test of this process may have left its one-rank default group."""
    own = not dist.is_initialized()
    if own:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        world = init_device_mesh("cpu", (1,), mesh_dim_names=("world",))
        yield ParallelMesh(dims=ParallelDims(), data=world._unflatten(0, (1, 1), ("dp", "cp")), fsdp=world)
    finally:
        if own:
            dist.destroy_process_group()


def local_bytes(model: torch.nn.Module) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def test_frozen_teacher_is_stored_in_the_gathered_dtype(one_rank_mesh, monkeypatch):
    monkeypatch.setattr(parallelize_module, "mixed_precision_policy", lambda *args: BF16_POLICY)
    reference = tiny_dit(0, dtype=torch.float32).requires_grad_(False)
    teacher, student = copy.deepcopy(reference), copy.deepcopy(reference).requires_grad_(True)
    buffers = {name: b.dtype for name, b in reference.named_buffers()}
    apply_fsdp(reference, one_rank_mesh.fsdp, BF16_POLICY)  # float32 shards, gathered in bf16
    parallelize_module.parallelize_wan_dit(teacher, one_rank_mesh, CONFIG, frozen=True)
    parallelize_module.parallelize_wan_dit(student, one_rank_mesh, CONFIG)

    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # trained networks keep fp32 masters
    assert {name: b.dtype for name, b in teacher.named_buffers()} == buffers
    assert 2 * local_bytes(teacher) == local_bytes(reference)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *LATENT_SHAPE, generator=g)
    t = torch.rand(2, generator=g)
    context = torch.randn(2, TINY["text_len"], TINY["text_dim"], generator=g)
    with torch.no_grad():
        expected, out = reference(x, t, context), teacher(x, t, context)
    assert expected.abs().max() > 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_sharded_network_loads_a_checkpoint_and_copies_it_shard_to_shard(one_rank_mesh, tmp_path, layout):
    """load_model_weights into DTensor parameters (no full load_state_dict), then copy_weights into another
    sharded network in bf16: every full tensor equals the checkpoint's."""
    state = {k: v.float().contiguous() for k, v in tiny_dit(4).state_dict().items()}
    if layout == "pth":
        torch.save(state, tmp_path / "teacher.pth")
        path = tmp_path / "teacher.pth"
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(state, tmp_path / "teacher.safetensors")
        path = tmp_path / "teacher.safetensors"
    with torch.device("meta"):
        student = tiny_dit(5, dtype=torch.float32)
    teacher = copy.deepcopy(student).requires_grad_(False)
    for network in (student, teacher):
        apply_fsdp(network, one_rank_mesh.fsdp, MixedPrecisionPolicy(cast_forward_inputs=False))
        network.to_empty(device="cpu")
    teacher.to(torch.bfloat16)
    load_model_weights(student, path)
    copy_weights(student, teacher)
    for network, dtype in ((student, torch.float32), (teacher, torch.bfloat16)):
        for name, parameter in network.named_parameters():
            assert parameter.to_local().dtype == dtype
            assert torch.equal(parameter.full_tensor(), state[name].to(dtype)), name
