"""One rCM student step of Wan2.1 1.3B at 480p (sCM + DMD, teacher CFG, AdamW update) on 1 or more GPUs with
FSDP2 and/or Ulysses context parallelism: step time, peak memory per GPU, throughput against one GPU.

    torchrun --nproc_per_node=1 bench/parallel_step.py                     # one GPU, the baseline
    torchrun --nproc_per_node=2 bench/parallel_step.py --dp-shard 2        # FSDP=2: a sample per GPU
    torchrun --nproc_per_node=2 bench/parallel_step.py --cp 2              # CP=2: one sample over both GPUs
    torchrun --nproc_per_node=2 bench/parallel_step.py --smoke --cp 2      # CPU (gloo), tiny model: checks the script

    torchrun --nproc_per_node=2 bench/parallel_step.py --model wan2.1-t2v-14B --layers 6 --dp-shard 2 \
        --full-state --dcp-dir /dev/shm/ckpt                               # 14B blocks: step, MFU, save + resume

Each run prints one Markdown table row (and ``--json PATH`` keeps it); pass the one-GPU run's samples/s
as ``--baseline`` to get the scaling column. MFU counts the model FLOPs of the step
(`rcm.distill.flops.rcm_student_step_flops`, recompute excluded) against the GPUs' dense bf16 peak.
``--full-state`` also holds what training holds beside the step (the fake score's AdamW state and the
student's EMA), so peak memory is a training run's; ``--dcp-dir`` then times a DCP save of the whole train
state (networks, optimizers, EMA) and a resume from it, checking that the resume restores the weights. Student, fake score and teacher are all built and sharded as
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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rcm.checkpoint.manager import CheckpointManager
from rcm.checkpoint.weights import copy_weights
from rcm.config import DistillConfig, load_model_preset, model_presets
from rcm.distill.distiller import Distiller
from rcm.distill.ema import PowerEMA
from rcm.distill.flops import bf16_peak_flops, rcm_student_step_flops
from rcm.models.wan_dit import WanDiTConfig, build_wan_dit
from rcm.parallel.distributed import DistributedInfo
from rcm.parallel.mesh import build_device_mesh, data_parallel_rank, mesh_dims
from rcm.parallel.parallelize import parallelize_wan_dit



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
    parser.add_argument("--model", default="wan2.1-t2v-1.3B", choices=model_presets(), help="configs/model preset")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the preset's)")
    parser.add_argument("--full-state", action="store_true",
                        help="also hold the fake score's AdamW state and the student's EMA, as training does")
    parser.add_argument("--dcp-dir", type=Path, default=None,
                        help="time a DCP save of the train state here and a resume from it (implies --full-state)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--student-iteration", type=int, default=0, help="backward simulation uses (this % 4) + 1 steps")
    parser.add_argument("--baseline", type=float, default=0.0, help="one-GPU samples/s, for the scaling column")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo): only checks that the script runs")
    args = parser.parse_args()
    args.full_state = args.full_state or args.dcp_dir is not None
    return args


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.smoke:
        device = torch.device("cpu")
        model_fields = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=8, num_heads=4, num_layers=2,
                            in_channels=4, out_channels=4, patch_size=(1, 2, 2))
        latent_shape, args.iters, args.model = (4, 2, 8, 8), 1, "tiny (smoke)"
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        preset = OmegaConf.to_container(load_model_preset(args.model))
        model_fields = {**preset, "num_layers": args.layers or preset["num_layers"], "attention_backend": "triton"}
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

    # As training builds them: on the meta device, sharded, then allocated shard by shard (the 14B's three
    # networks never fit one GPU in full); random weights drawn on the shards, the same on every rank.
    with torch.device("meta"):
        student = build_wan_dit(model_fields)
    fake_score = copy.deepcopy(student)
    teacher = copy.deepcopy(student).requires_grad_(False)
    for network in (student, fake_score):
        parallelize_wan_dit(network, mesh, parallel)
    parallelize_wan_dit(teacher, mesh, parallel, frozen=True)
    torch.manual_seed(0)
    student.to_empty(device=device)
    student.init_weights()
    with torch.no_grad():  # Wan zero-inits the head; random weights exercise every path
        student.head.head.weight.normal_(std=0.02)
    for network in (fake_score, teacher):
        network.to_empty(device=device)
        copy_weights(student, network)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01)
    fake_optimizer = ema = None
    if args.full_state:  # what a training run holds beside the student step: the fake score's AdamW state, the EMA
        fake_optimizer = torch.optim.AdamW(fake_score.parameters(), lr=0.0)
        for parameter in fake_score.parameters():
            parameter.grad = torch.zeros_like(parameter)
        fake_optimizer.step()  # materializes its state (lr 0: the weights stay)
        fake_score.zero_grad(set_to_none=True)
        ema = PowerEMA(student)

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
            # Without warmup, iteration 5·k is the student step whose effective iteration is k.
            result = distiller.loss(batch, iteration=5 * args.student_iteration)
        result.loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2 or args.smoke:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    checkpoint = time_dcp_save_and_resume(args.dcp_dir, world_size, rank, student, optimizer, fake_score,
                                          fake_optimizer, ema) if args.dcp_dir else {}
    memory = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=device)
    step_time = torch.tensor(seconds, device=device)
    if world_size > 1:
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        dist.all_reduce(step_time, op=dist.ReduceOp.MAX)
    samples_per_s = dims.data_parallel_size / float(step_time)
    tokens = latent_shape[1] * latent_shape[2] * latent_shape[3] // 4
    step_flops = rcm_student_step_flops(WanDiTConfig(**model_fields), tokens, text_len, args.student_iteration)
    peak = bf16_peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    achieved = dims.data_parallel_size * (step_flops.linear + step_flops.attention) / float(step_time) / world_size
    row = {
        "gpus": world_size, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "cp": dims.cp,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke)", "torch": torch.__version__,
        "tokens_per_sample": tokens, "step_time_s": float(step_time), "peak_memory_gib": float(memory),
        "samples_per_s": samples_per_s, "scaling_vs_1gpu": samples_per_s / (world_size * args.baseline) if args.baseline else None,
        "loss": result.loss.item(), "ac_every": args.ac_every, "param_dtype": args.param_dtype, "compile": args.compile,
        "model": args.model, "layers": model_fields["num_layers"], "full_state": args.full_state,
        "tflops_per_gpu": achieved / 1e12, "mfu": achieved / peak if peak else None, **checkpoint,
    }
    if rank == 0:
        scaling = f"{row['scaling_vs_1gpu']:.2f}" if row["scaling_vs_1gpu"] is not None else "–"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "–"
        print(f"\n{row['device']}; torch {row['torch']}; {args.model}, {row['layers']} blocks; {tokens} tokens/sample; "
              f"checkpoint every {args.ac_every} block(s); FSDP param dtype {args.param_dtype}; compile {args.compile}; "
              f"full train state {args.full_state}; loss {row['loss']:.3f}; step {step_flops.linear / 1e12:.1f} + "
              f"{step_flops.attention / 1e12:.1f} TFLOP (linear + attention) per sample")
        if checkpoint:
            print(f"DCP: saved {checkpoint['dcp_gb']:.1f} GB in {checkpoint['dcp_save_s']:.1f} s, resumed in "
                  f"{checkpoint['dcp_load_s']:.1f} s; weights restored: {checkpoint['dcp_restored']}")
        print("| GPUs | dp_replicate × dp_shard × cp | step time (s) | peak memory / GPU (GiB) | samples/s | scaling vs 1 GPU | TFLOP/s / GPU | MFU |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        print(f"| {world_size} | {dims.dp_replicate} × {dims.dp_shard} × {dims.cp} | {row['step_time_s']:.3f} | "
              f"{row['peak_memory_gib']:.1f} | {samples_per_s:.3f} | {scaling} | {row['tflops_per_gpu']:.0f} | {mfu} |")
        if args.json:
            args.json.write_text(json.dumps(row, indent=2))
    if world_size > 1:
        # Every rank tears the group down together: a rank leaving while rank 0 still prints made gloo abort
        # ("terminate called without an active exception") in about one run in five on the CPU.
        dist.barrier()
        dist.destroy_process_group()


def time_dcp_save_and_resume(directory: Path, world_size: int, rank: int, student, optimizer, fake_score,
                             fake_optimizer, ema) -> dict:
    """A synchronous DCP save of the whole train state (as `Trainer.checkpoint_state` lays it out), the
    student's weights then changed, and a resume that must bring them back: seconds, size, restored."""
    info = DistributedInfo(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    manager = CheckpointManager(directory, info, keep_last=1)

    def state() -> dict:
        return {"ema": ema.state_dict(), "student": get_model_state_dict(student),
                "optim_student": get_optimizer_state_dict(student, optimizer),
                "fake_score": get_model_state_dict(fake_score),
                "optim_fake_score": get_optimizer_state_dict(fake_score, fake_optimizer)}

    def weights_sum() -> float:
        with torch.no_grad():
            total = sum(p.to_local().double().sum() if hasattr(p, "to_local") else p.double().sum()
                        for p in student.parameters())
        if world_size > 1:
            dist.all_reduce(total)
        return float(total)

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if manager.latest() is not None:
        raise SystemExit(f"--dcp-dir {directory} already holds a checkpoint; give an empty directory")
    before = weights_sum()
    synchronize()
    start = time.perf_counter()
    path = manager.save(1, state(), {"rank": rank}, wait=True)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    start = time.perf_counter()
    loaded = state()
    manager.load(path, loaded)
    set_model_state_dict(student, loaded["student"])
    set_optimizer_state_dict(student, optimizer, loaded["optim_student"])
    set_model_state_dict(fake_score, loaded["fake_score"])
    set_optimizer_state_dict(fake_score, fake_optimizer, loaded["optim_fake_score"])
    ema.load_state_dict(loaded["ema"])
    synchronize()
    load_s = time.perf_counter() - start
    restored = abs(weights_sum() - before) <= 1e-6 * max(1.0, abs(before))
    manager.close()
    return {"dcp_save_s": save_s, "dcp_load_s": load_s, "dcp_gb": size, "dcp_restored": restored}


if __name__ == "__main__":
    main()
