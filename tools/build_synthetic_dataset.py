"""Build a synthetic data set: the teacher's samples (CFG, N Euler steps) written as training shards.

    python tools/build_synthetic_dataset.py --teacher runs/toy_teacher --out runs/synthetic --num-samples 4096 --guidance 2
    torchrun --nproc_per_node=8 tools/build_synthetic_dataset.py --teacher teacher.pth --model wan2.1-t2v-1.3B \\
        --prompts embeddings/ --latent-shape 16 21 60 104 --negative-embedding negative.pt --out data/synthetic
    python tools/build_synthetic_dataset.py ... --shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT

The output is exactly what training reads (rcm/data/shards.py): `shard-NNNNNN.tar` with members
`NNNNNNNNN.latent.pt`, `.embed.pt`, `.prompt.txt`; for toy prompts also `ground_truth.pt` and
`negative_embedding.pt`, so `data.shards=OUT` works with the toy data config. Sample i uses prompt
i mod (number of prompts) and lands in shard i // --samples-per-shard.

Shard s goes to rank s mod world size (within --shard-index of --num-shards when given) and draws its noise
from the seed (--seed, s) alone. It is written under a hidden `.shard-NNNNNN.tar.partial` name and renamed
when complete, so a crash never leaves a shard that looks complete. Rerunning the same command (after a
crash or requeue, with any number of ranks) skips complete shards, deletes leftover partial files and
writes byte-identical shards. `build_config.json` records the options; a rerun with different ones stops.

Prompts (see rcm/eval/prompts.py): 'toy' (the ground truth's classes), a directory of embedding files
NAME.pt (+ NAME.txt with the prompt), or a list file with one embedding path (or toy prompt) per line.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from rcm.data.shards import SHARD_NAME, partial_shard_path, write_shards
from rcm.data.toy import GROUND_TRUTH_FILE, NEGATIVE_EMBEDDING_FILE
from rcm.distill.trigflow import pad_tokens
from rcm.eval.cli import HelpFormatter, run_on_every_rank
from rcm.eval.networks import DTYPES, NetworkSource, network_dtype_name
from rcm.eval.prompts import TOY_PROMPTS, PromptInputs, resolve_prompt_inputs
from rcm.eval.sampling import TEACHER, SamplerSetting, sample_batch
from rcm.atomic_files import atomic_torch_save, atomic_write_bytes
from rcm.eval.sharding import item_seed, resolve_work_shard
from rcm.parallel.distributed import DistributedInfo, barrier

BUILD_CONFIG_FILE = "build_config.json"
CRASH_EXIT_CODE = 75  # --stop-after-shards: the exit status of the simulated crash
CRASH_AFTER_SAMPLES = 3  # samples of the interrupted shard that reach its partial file first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the synthetic data set builder."""
    parser = argparse.ArgumentParser(prog="build_synthetic_dataset", description=__doc__, formatter_class=HelpFormatter)
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--teacher", required=True, help="teacher run directory (config.yaml + checkpoints/), or a "
                         "checkpoint (.pth / DCP directory) together with --model")
    teacher.add_argument("--model", default=None, help="model preset (configs/model/NAME.yaml) when --teacher is a bare checkpoint")
    teacher.add_argument("--weights", choices=["ema", "student"], default="ema", help="which weights of the checkpoint to use")
    teacher.add_argument("--steps", type=int, default=50, help="Euler steps of the teacher's sampler")
    teacher.add_argument("--guidance", type=float, default=1.0, help="CFG scale (needs a negative embedding unless 1)")
    teacher.add_argument("--shift", type=float, default=5.0, help="sampling time shift")
    data = parser.add_argument_group("prompts and output")
    data.add_argument("--out", type=Path, required=True, help="output directory of the shards")
    data.add_argument("--prompts", default=TOY_PROMPTS, help="'toy', a directory of NAME.pt embeddings, or a list file")
    data.add_argument("--ground-truth", default=None, help="toy ground_truth.pt (default: the teacher run's data.ground_truth)")
    data.add_argument("--negative-embedding", default=None, help="CFG negative prompt embedding .pt (default: the toy's, "
                      "else the teacher run's data.negative_embedding)")
    data.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=None,
                      help="latent shape for non-toy prompts (default: the teacher run's data.latent_shape)")
    data.add_argument("--num-samples", type=int, default=1000, help="samples to write, cycling over the prompts")
    data.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar shard")
    data.add_argument("--batch-size", type=int, default=32, help="samples per teacher forward (part of the "
                      "configuration: changing it may change the last bits of the latents)")
    data.add_argument("--seed", type=int, default=0, help="data seed; shard s draws its noise from the seed (seed, s)")
    work = parser.add_argument_group("work sharing")
    work.add_argument("--shard-index", type=int, default=None, help="this job's part (Slurm array: $SLURM_ARRAY_TASK_ID); "
                      "default: the rank")
    work.add_argument("--num-shards", type=int, default=None, help="number of parts (Slurm array: "
                      "$SLURM_ARRAY_TASK_COUNT); default: the world size")
    work.add_argument("--device", default="auto", help="'auto' (this rank's GPU if any, else CPU), 'cpu' or 'cuda'")
    work.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="the teacher's dtype (default: bfloat16 on CUDA, float32 on CPU; the 14B teacher needs 57 GB "
                           "in float32); part of the recorded configuration")
    # Tests: simulate a crash (os._exit) after this many shards, with the next shard's partial file left behind.
    work.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("num_samples", "samples_per_shard", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        resolve_work_shard(DistributedInfo(), args.shard_index, args.num_shards)
    except ValueError as error:
        parser.error(str(error))
    return args


def build_config(args: argparse.Namespace, teacher: NetworkSource, inputs: PromptInputs) -> dict:
    """Everything that determines the shards' bytes; a rerun must match it."""
    prompt_digest = hashlib.sha256()
    for prompt in inputs.prompts:
        prompt_digest.update(f"{prompt.text}\0{prompt.embedding_digest()}\0".encode())
    return {
        "teacher_checkpoint": teacher.checkpoint(), "weights": args.weights, "steps": args.steps,
        "guidance": args.guidance, "shift": args.shift, "prompts": args.prompts, "num_prompts": len(inputs.prompts),
        "prompts_sha256": prompt_digest.hexdigest(), "latent_shape": list(inputs.latent_shape),
        "num_samples": args.num_samples, "samples_per_shard": args.samples_per_shard, "batch_size": args.batch_size,
        "seed": args.seed, "dtype": args.dtype,
    }


def check_or_record_config(out: Path, config: dict, info: DistributedInfo) -> None:
    """Stop if `out` was started with other options; otherwise record them (rank 0)."""
    path = out / BUILD_CONFIG_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        differing = sorted(key for key in config if recorded.get(key) != config[key])
        if differing:
            raise ValueError(f"{out} holds shards built with other options (differing: {', '.join(differing)}; see {path}); "
                             "use another --out, or delete the directory to rebuild")
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(config, indent=2) + "\n").encode())


def shard_samples(
    network: torch.nn.Module, setting: SamplerSetting, inputs: PromptInputs, shard_number: int,
    args: argparse.Namespace, text_len: int,
) -> Iterator[dict]:
    """The sample dicts {latent, embed, prompt} of one shard, generated batch by batch."""
    device = next(network.parameters()).device
    first = shard_number * args.samples_per_shard
    last = min(first + args.samples_per_shard, args.num_samples)
    generator = torch.Generator(device).manual_seed(item_seed(args.seed, shard_number))
    negative = None if inputs.negative_embedding is None else inputs.negative_embedding.to(device)
    for start in range(first, last, args.batch_size):
        prompts = [inputs.prompts[i % len(inputs.prompts)] for i in range(start, min(start + args.batch_size, last))]
        context = torch.cat([pad_tokens(p.embedding.to(device).unsqueeze(0), text_len) for p in prompts])
        noise = torch.randn((len(prompts), *inputs.latent_shape), generator=generator, device=device)
        latents = sample_batch(network, setting, noise, context, generator, negative).float().cpu()
        for prompt, latent in zip(prompts, latents):
            yield {"latent": latent, "embed": prompt.embedding, "prompt": prompt.text}


def _crash_midway(samples: Iterator[dict]) -> Iterator[dict]:
    """Pass a few samples on, then end the process abruptly (a simulated crash mid-shard)."""
    yield from itertools.islice(samples, CRASH_AFTER_SAMPLES)
    os._exit(CRASH_EXIT_CODE)


def build(args: argparse.Namespace, info: DistributedInfo, device: torch.device) -> int:
    """Write this process's missing shards; rank 0 then finishes the data set if every shard is there."""
    args.dtype = network_dtype_name(args.dtype, device)  # resolved here: the recorded configuration has it
    teacher = NetworkSource.open(args.teacher, args.model)
    inputs = resolve_prompt_inputs(args.prompts, teacher, args.ground_truth, args.negative_embedding, args.latent_shape)
    setting = SamplerSetting(f"teacher_{args.steps}", TEACHER, args.steps, args.guidance, args.shift)
    if args.guidance > 1.0 and inputs.negative_embedding is None:
        raise ValueError(f"--guidance {args.guidance} needs the negative prompt's embedding: pass --negative-embedding PATH")
    out: Path = args.out
    check_or_record_config(out, build_config(args, teacher, inputs), info)
    barrier(info)
    total_shards = math.ceil(args.num_samples / args.samples_per_shard)
    work = resolve_work_shard(info, args.shard_index, args.num_shards)
    network = None
    written = skipped = 0
    started = time.perf_counter()
    for shard_number in tqdm(work.items(total_shards), disable=not info.is_main, desc="teacher shards", unit="shard"):
        final = out / SHARD_NAME.format(shard_number)
        if final.is_file():
            skipped += 1
            continue
        partial_shard_path(final).unlink(missing_ok=True)  # left by a crashed earlier run
        if network is None:  # loaded on first need: a finished rank never reads the checkpoint
            network = teacher.load(args.weights, device, DTYPES[args.dtype])
        samples = shard_samples(network, setting, inputs, shard_number, args, teacher.model_cfg.text_len)
        if args.stop_after_shards is not None and written == args.stop_after_shards:
            samples = _crash_midway(samples)
        write_shards(samples, out, args.samples_per_shard, start_index=shard_number * args.samples_per_shard)
        written += 1
    print(f"[build_synthetic_dataset] part {work.index} of {work.count}: {written} shard(s) written, {skipped} already "
          f"complete ({time.perf_counter() - started:.1f} s)", flush=True)
    barrier(info)
    if info.is_main:
        finish_dataset(out, inputs, total_shards, args.num_samples)
    return 0


def finish_dataset(out: Path, inputs: PromptInputs, total_shards: int, num_samples: int) -> None:
    """Once every shard exists: write the CFG negative embedding and the toy ground truth beside them."""
    missing = [number for number in range(total_shards) if not (out / SHARD_NAME.format(number)).is_file()]
    if missing:
        print(f"[build_synthetic_dataset] {total_shards - len(missing)} of {total_shards} shards are complete in {out}; "
              "the data set is finished when every part has run", flush=True)
        return
    if inputs.negative_embedding is not None:
        atomic_torch_save(inputs.negative_embedding, out / NEGATIVE_EMBEDDING_FILE)
    if inputs.mixture is not None:
        inputs.mixture.save(out / GROUND_TRUTH_FILE)
    print(f"[build_synthetic_dataset] {out}: {num_samples} samples in {total_shards} shards, complete", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (one process, torchrun, or Slurm tasks)."""
    args = parse_args(argv)
    return run_on_every_rank(lambda info, device: build(args, info, device), args.device)


if __name__ == "__main__":
    from rcm.cli_errors import run_cli

    sys.exit(run_cli(main, "build_synthetic_dataset"))
