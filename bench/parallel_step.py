"""One rCM student step of Wan2.1 1.3B at 480p (sCM + DMD, teacher CFG, AdamW update) on 1 or more GPUs with
FSDP2 and/or Ulysses context parallelism: step time, peak memory per GPU, throughput against one GPU.

    torchrun --nproc_per_node=1 bench/parallel_step.py                     # one GPU, the baseline
    torchrun --nproc_per_node=2 bench/parallel_step.py --dp-shard 2        # FSDP=2: a sample per GPU
    torchrun --nproc_per_node=2 bench/parallel_step.py --cp 2              # CP=2: one sample over both GPUs
    torchrun --nproc_per_node=2 bench/parallel_step.py --smoke --cp 2      # CPU (gloo), tiny model: checks the script

Each run prints one Markdown table row (and ``--json PATH`` keeps it); pass the one-GPU run's samples/s
as ``--baseline`` to get the scaling column. Student, fake score and teacher are all built and sharded as
training does (rcm.parallel.parallelize_wan_dit); every block is checkpointed (``--ac-every``). Random
weights; the student's generation uses one backward-simulation step (``--student-iteration`` picks 1–4).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from rcm.config import DistillConfig
from rcm.distill.distiller import Distiller
from rcm.models.wan_dit import build_wan_dit
from rcm.parallel.mesh import build_device_mesh, data_parallel_rank, mesh_dims
from rcm.parallel.parallelize import parallelize_wan_dit

MODEL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "wan2.1-t2v-1.3B.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp-shard", type=int, default=-1, help="FSDP shard size over data (-1: what cp leaves)")
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1, help="Ulysses context-parallel size (divides 12 heads)")
    parser.add_argument("--ac-every", type=int, default=1, help="checkpoint every k-th block (0: off)")
    parser.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--no-reshard-after-forward", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (parallel.compile)")
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--iters", type=int, default=5, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--student-iteration", type=int, default=0, help="backward simulation uses (this % 4) + 1 steps")
    parser.add_argument("--baseline", type=float, default=0.0, help="one-GPU samples/s, for the scaling column")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo): only checks that the script runs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.smoke:
        device = torch.device("cpu")
        model_fields = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=8, num_heads=4, num_layers=2,
                            in_channels=4, out_channels=4, patch_size=(1, 2, 2))
        latent_shape, args.iters = (4, 2, 8, 8), 1
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        model_fields = {**OmegaConf.to_container(OmegaConf.load(MODEL_CONFIG)), "num_layers": args.layers,
                        "attention_backend": "triton"}
        latent_shape = (16, args.frames, args.height, args.width)
    if world_size > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    parallel = SimpleNamespace(dp_replicate=args.dp_replicate, dp_shard=args.dp_shard, cp=args.cp,
                               activation_checkpointing_every=args.ac_every, grad_accumulation=1,
                               reshard_after_forward=not args.no_reshard_after_forward,
                               param_dtype=args.param_dtype, reduce_dtype="float32",
                               compile=args.compile, compile_backend="inductor")
    mesh = build_device_mesh(parallel, world_size, device.type, num_heads=model_fields["num_heads"])
    dims = mesh_dims(mesh)

    torch.manual_seed(0)  # identical weights on every rank: FSDP shards each rank's full copy
    with torch.device(device):
        student = build_wan_dit(model_fields)
    with torch.no_grad():  # Wan zero-inits the head; random weights exercise every path
        student.head.head.weight.normal_(std=0.02)
    fake_score = copy.deepcopy(student)
    teacher = copy.deepcopy(student).requires_grad_(False)
    for network in (student, fake_score):
        parallelize_wan_dit(network, mesh, parallel)
    parallelize_wan_dit(teacher, mesh, parallel, frozen=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01)

    dp_rank = data_parallel_rank(mesh)  # ranks of one CP group draw the same batch, noise and times
    g = torch.Generator(device).manual_seed(1 + dp_rank)
    text_len, text_dim = model_fields["text_len"], model_fields["text_dim"]
    batch = {"latent": torch.randn(1, *latent_shape, device=device, generator=g),
             "embed": torch.randn(1, text_len, text_dim, device=device, generator=g)}
    negative = torch.randn(text_len, text_dim, device=device, generator=g)
    distill = DistillConfig(method="rcm", tangent_warmup=0, student_update_freq=5)
    distiller = Distiller(distill, student, teacher, fake_score, negative,
                          torch.Generator(device).manual_seed(1000 + dp_rank))

    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.iters + 2):
        if cuda:
            torch.cuda.synchronize()
        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            result = distiller.loss(batch, iteration=0, student_iteration=args.student_iteration)
        result.loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2 or args.smoke:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    memory = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=device)
    step_time = torch.tensor(seconds, device=device)
    if world_size > 1:
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        dist.all_reduce(step_time, op=dist.ReduceOp.MAX)
    samples_per_s = dims.data_parallel_size / float(step_time)
    tokens = latent_shape[1] * latent_shape[2] * latent_shape[3] // 4
    row = {
        "gpus": world_size, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "cp": dims.cp,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke)", "torch": torch.__version__,
        "tokens_per_sample": tokens, "step_time_s": float(step_time), "peak_memory_gib": float(memory),
        "samples_per_s": samples_per_s, "scaling_vs_1gpu": samples_per_s / (world_size * args.baseline) if args.baseline else None,
        "loss": result.loss.item(), "ac_every": args.ac_every, "param_dtype": args.param_dtype, "compile": args.compile,
    }
    if rank == 0:
        scaling = f"{row['scaling_vs_1gpu']:.2f}" if row["scaling_vs_1gpu"] is not None else "–"
        print(f"\n{row['device']}; torch {row['torch']}; {tokens} tokens/sample; checkpoint every {args.ac_every} block(s); "
              f"FSDP param dtype {args.param_dtype}; compile {args.compile}; loss {row['loss']:.3f}")
        print("| GPUs | dp_replicate × dp_shard × cp | step time (s) | peak memory / GPU (GiB) | samples/s | scaling vs 1 GPU |")
        print("|---:|---|---:|---:|---:|---:|")
        print(f"| {world_size} | {dims.dp_replicate} × {dims.dp_shard} × {dims.cp} | {row['step_time_s']:.3f} | "
              f"{row['peak_memory_gib']:.1f} | {samples_per_s:.3f} | {scaling} |")
        if args.json:
            args.json.write_text(json.dumps(row, indent=2))
    if world_size > 1:
        # Every rank tears the group down together: a rank leaving while rank 0 still prints made gloo abort
        # ("terminate called without an active exception") in about one run in five on the CPU.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
