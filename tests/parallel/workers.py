"""What the parallelism tests run: one rCM step (or one JVP-mode forward) of tiny float32 DiTs, either in
spawned gloo processes under a mesh, or in this process as the single-process reference.

The reference computes the same global objective: the loss of every data-parallel rank's micro-batch
in turn, drawn with that rank's generator, each backpropagated with weight 1/(dp · micro-batches) —
i.e. a single process with gradient accumulation over the global batch.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rcm.config import DistillConfig
from rcm.distill.distiller import Distiller
from rcm.parallel.gradient_accumulation import backward_micro_batches, split_micro_batches
from rcm.parallel.mesh import build_device_mesh, data_parallel_rank
from rcm.parallel.parallelize import parallelize_wan_dit
from tests.helpers import LATENT_SHAPE, TINY, tiny_dit

NUM_LAYERS = 2
SAMPLES_PER_MICRO_BATCH = 1
# With student_update_freq=2 and no warmup, iteration 2 is student step k_s = 1 and iteration 3 critic step k_c = 1:
# both generate with two backward-simulation steps (a no-grad student forward, then one with grad).
STEP_ITERATION = {"student": 2, "fake_score": 3}


def parallel_config(spec: dict) -> SimpleNamespace:
    """The ``parallel`` config section of a scenario, float32 everywhere."""
    return SimpleNamespace(
        dp_replicate=spec.get("dp_replicate", 1), dp_shard=spec.get("dp_shard", 1), cp=spec.get("cp", 1),
        compile=spec.get("compile", False), compile_backend="aot_eager",  # aot_eager: no C++ compiler in CI
        activation_checkpointing_every=spec.get("ac_every", 0), grad_accumulation=spec.get("grad_accumulation", 1),
        reshard_after_forward=spec.get("reshard_after_forward", True), param_dtype="float32", reduce_dtype="float32")


def build_networks():
    """(student, fake score, frozen teacher): tiny float32 DiTs with different random weights."""
    student = tiny_dit(0, num_layers=NUM_LAYERS).float()
    fake_score = tiny_dit(1, num_layers=NUM_LAYERS).float()
    teacher = tiny_dit(2, num_layers=NUM_LAYERS).float().requires_grad_(False)
    return student, fake_score, teacher


def rank_batch(dp_rank: int, spec: dict) -> dict[str, torch.Tensor]:
    """Data-parallel rank ``dp_rank``'s batch (all its micro-batches), the same on every rank of its CP group."""
    samples = SAMPLES_PER_MICRO_BATCH * spec.get("grad_accumulation", 1)
    g = torch.Generator().manual_seed(100 + dp_rank)
    return {"latent": torch.randn(samples, *LATENT_SHAPE, generator=g),
            "embed": torch.randn(samples, TINY["text_len"] - 1, TINY["text_dim"], generator=g)}


def negative_embedding() -> torch.Tensor:
    """The CFG negative prompt's embedding (L, text_dim)."""
    return torch.randn(TINY["text_len"], TINY["text_dim"], generator=torch.Generator().manual_seed(7))


def jvp_inputs(dp_rank: int):
    """(x, timestep, context, ẋ, ṫ) of data-parallel rank ``dp_rank``, and weights for a scalar loss of the output."""
    g = torch.Generator().manual_seed(200 + dp_rank)
    x = torch.randn(2, *LATENT_SHAPE, generator=g)
    context = torch.randn(2, TINY["text_len"], TINY["text_dim"], generator=g)
    x_dot, weights = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    return x, torch.tensor([130.0, 870.0]), context, x_dot, torch.tensor([40.0, -25.0]), weights


def full_gradients(network) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (FSDP shards gathered)."""
    grads = {}
    for name, parameter in network.named_parameters():
        grad = parameter.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        grads[name] = grad.detach().clone()
    return grads


_last_networks: dict = {}


def describe_sharding() -> dict[str, bool]:
    """Whether the last scenario's networks were sharded as asked: trainable ones DTensors with gradients, the
    teacher DTensors without gradients (hence nothing for an optimizer)."""
    student, fake_score, teacher = (_last_networks[k] for k in ("student", "fake_score", "teacher"))
    return {
        "student_sharded": all(isinstance(p, DTensor) for p in student.parameters()),
        "fake_score_sharded": all(isinstance(p, DTensor) for p in fake_score.parameters()),
        "teacher_sharded": all(isinstance(p, DTensor) for p in teacher.parameters()),
        "teacher_frozen": all(not p.requires_grad and p.grad is None for p in teacher.parameters()),
    }


def run_step(spec: dict, mesh, dp_rank: int) -> dict:
    """One scenario on this process: loss(es) or outputs of ``dp_rank``, and the trained network's gradients."""
    student, fake_score, teacher = build_networks()
    config = parallel_config(spec)
    for network in (student, fake_score):
        parallelize_wan_dit(network, mesh, config)
    parallelize_wan_dit(teacher, mesh, config, frozen=True)
    _last_networks.update(student=student, fake_score=fake_score, teacher=teacher)
    if spec["step"] == "jvp":
        x, timestep, context, x_dot, timestep_dot, weights = jvp_inputs(dp_rank)
        out, tangent = student(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
        (out * weights).sum().backward()  # FSDP averages the gradients over data-parallel ranks
        return {"out": out.detach(), "tangent": tangent, "grads": full_gradients(student)}
    distill = DistillConfig(method="rcm", guidance_scale=2.0, tangent_warmup=0, student_update_freq=2)
    generator = torch.Generator().manual_seed(1000 + dp_rank)
    distiller = Distiller(distill, student, teacher, fake_score, negative_embedding(), generator)
    iteration = STEP_ITERATION[spec["step"]]
    network = student if spec["step"] == "student" else fake_score
    micro_batches = split_micro_batches(rank_batch(dp_rank, spec), spec.get("grad_accumulation", 1))
    results = backward_micro_batches(network, micro_batches,
                                     lambda batch: distiller.loss(batch, iteration))
    losses = [r.loss.item() for r in results]
    return {"losses": losses, "grads": full_gradients(network)}


def run_reference(spec: dict) -> dict:
    """The single-process run of a scenario: per data-parallel rank results, gradients of the global objective."""
    data_parallel_size = spec.get("dp_replicate", 1) * spec.get("dp_shard", 1)
    reference_spec = {"step": spec["step"], "grad_accumulation": spec.get("grad_accumulation", 1)}
    per_rank, grads = [], None
    for dp_rank in range(data_parallel_size):
        result = run_step(reference_spec, None, dp_rank)
        # the global objective is the mean over data-parallel ranks (FSDP averages their gradients)
        scaled = {name: grad / data_parallel_size for name, grad in result["grads"].items()}
        grads = scaled if grads is None else {name: grads[name] + scaled[name] for name in grads}
        per_rank.append(result)
    return {"per_rank": per_rank, "grads": grads}


def worker_main(rank: int, world_size: int, port: int, scenarios: dict[str, dict], out_dir: str) -> None:
    """Entry point of a spawned rank: run every scenario under its mesh and save this rank's results."""
    torch.set_num_threads(1)  # 2 and 4 processes share the machine's few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for name, spec in scenarios.items():
            config = parallel_config(spec)
            mesh = build_device_mesh(config, world_size, "cpu", num_heads=TINY["num_heads"])
            torch._dynamo.utils.counters.clear()
            result = run_step(spec, mesh, data_parallel_rank(mesh))
            result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            result["dp_rank"] = data_parallel_rank(mesh)
            result["sharding"] = describe_sharding()
            torch.save(result, Path(out_dir) / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()
