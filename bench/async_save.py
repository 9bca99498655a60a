"""Training stall of an asynchronous checkpoint against a synchronous one, for the Wan2.1 1.3B rCM training state.

    python bench/async_save.py --dir /local/disk/ckpt_bench        # CUDA: the real 1.3B state (~40 GB)
    python bench/async_save.py --dir D --latent 21 60 104 --checkpointing   # the 480p step (32,760 tokens)
    python bench/async_save.py --dir D --async-mode both           # thread and writer-process stalls, one run
    python bench/async_save.py --smoke                             # CPU: the tiny model, to check the script

The state is what rCM training holds, all float32 (bf16 autocast keeps float32 master weights): the student,
its EMA, the fake score and the AdamW moments of both. A step is a student forward + backward under bf16
autocast on a latent video, the AdamW update and the EMA update. Measured with `CheckpointManager`:

- sync: the time ``save`` blocks (the whole write);
- async: the time ``save`` blocks (the copy into pinned CPU memory) plus the extra time of the steps that run
  while the background thread writes (GIL and PCIe contention), until the checkpoint is complete. The first
  asynchronous save also allocates and pins the staging buffers; the second reuses them (steady state).

The stall ratio (async / sync) is the number to keep small (goal ≤ 10 %). Each checkpoint is deleted after
its measurement, so the disk needs room for one. The default step (1,560 tokens, ~0.3 s) is launch-bound:
the writer thread's share of the GIL slows it most; the 480p step with every block checkpointed is
GPU-bound, as real training at that shape is.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # noqa: E402

from rcm.checkpoint.manager import CheckpointManager, read_marker  # noqa: E402
from rcm.distill.ema import PowerEMA  # noqa: E402
from rcm.models.wan_dit import WanDiT, WanDiTConfig  # noqa: E402
from rcm.parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402


class TrainingState:
    """Student, EMA, fake score and two AdamW optimizers, with a representative student step."""

    def __init__(self, model: str, latent: tuple[int, ...], device: torch.device, checkpointing: bool = False):
        config = WanDiTConfig(**yaml.safe_load((REPO / "configs/model" / f"{model}.yaml").read_text()))
        if device.type == "cuda":
            config.attention_backend = "triton"
        with device:
            self.student = WanDiT(config)
        self.fake_score = copy.deepcopy(self.student)
        if checkpointing:  # after the copy: the wrapper holds the block's own bound forward
            apply_activation_checkpointing(self.student)
        self.ema = PowerEMA(self.student, 0.1)
        self.optimizers = {
            "student": torch.optim.AdamW(self.student.parameters(), lr=2e-6, betas=(0.0, 0.999)),
            "fake_score": torch.optim.AdamW(self.fake_score.parameters(), lr=4e-7, betas=(0.0, 0.999)),
        }
        for optimizer in self.optimizers.values():  # the moments exist from the first step on
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        self.device = device
        self.x = torch.randn(1, config.in_channels, *latent, device=device)
        self.context = torch.randn(1, config.text_len, config.text_dim, device=device)
        self.iteration = 0

    def state_bytes(self) -> int:
        """Bytes of the checkpointed tensors."""
        networks = sum(p.nbytes for p in self.student.parameters()) * 2 + sum(t.nbytes for t in self.ema.shadow.values())
        moments = sum(t.nbytes for o in self.optimizers.values() for s in o.state.values() for t in s.values())
        return networks + moments

    def checkpoint_state(self) -> dict:
        """What the Trainer hands to the checkpoint manager."""
        state = {"ema": self.ema.state_dict()}
        for role, network in (("student", self.student), ("fake_score", self.fake_score)):
            state[role] = get_model_state_dict(network)
            state[f"optim_{role}"] = get_optimizer_state_dict(network, self.optimizers[role])
        return state

    def step(self) -> float:
        """One student update; returns its wall time in seconds."""
        self._synchronize()
        started = time.perf_counter()
        optimizer = self.optimizers["student"]
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with autocast:
            out = self.student(self.x, torch.full((1,), 500.0, device=self.device), self.context)
        out.float().pow(2).mean().backward()
        optimizer.step()
        self.ema.update(self.student, self.iteration)
        self.iteration += 1
        self._synchronize()
        return time.perf_counter() - started

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def measure_save(state: TrainingState, manager: CheckpointManager, baseline: float, iteration: int) -> dict:
    """Blocking time of save(), extra step time while it writes, and the write's own duration."""
    state._synchronize()
    started = time.perf_counter()
    path = manager.save(iteration, state.checkpoint_state(), {"iteration": iteration})
    blocked = time.perf_counter() - started
    steps = []
    while manager.in_flight:
        steps.append(state.step())
    manager.wait()
    total = time.perf_counter() - started
    extra = sum(max(0.0, s - baseline) for s in steps)
    result = {"blocked_s": blocked, "steps_during_write": len(steps), "extra_step_s": extra, "stall_s": blocked + extra,
              "complete_after_s": total, "write_s": read_marker(path)["seconds"]}
    shutil.rmtree(path)
    return result


def main() -> None:
    """Run the measurement and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/rcm_async_save_bench"))
    parser.add_argument("--model", default="wan2.1-t2v-1.3B")
    parser.add_argument("--latent", type=int, nargs=3, default=[2, 30, 52], metavar=("T", "H", "W"),
                        help="latent frames, height, width (default 1560 tokens: without activation checkpointing "
                             "a block keeps ~170 KB per token, and the state itself takes ~40 GB)")
    parser.add_argument("--checkpointing", action="store_true", help="checkpoint every block (needed for 480p)")
    parser.add_argument("--async-mode", default="thread", choices=["thread", "process", "both"],
                        help="where asynchronous saves are written from (both: one after the other, same run)")
    parser.add_argument("--baseline-steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.latent, args.baseline_steps = "tiny", [2, 8, 8], 3
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    state = TrainingState(args.model, tuple(args.latent), device, args.checkpointing)
    for _ in range(2):
        state.step()  # warm-up: kernels, allocator
    baseline = statistics.median(state.step() for _ in range(args.baseline_steps))
    shutil.rmtree(args.dir, ignore_errors=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "model": args.model, "latent": args.latent, "checkpointing": args.checkpointing, "state_gb": state.state_bytes() / 1e9, "baseline_step_s": baseline}
    results["sync"] = measure_save(state, CheckpointManager(args.dir / "sync", async_save=False), baseline, 1)
    print(json.dumps(results["sync"]), flush=True)
    modes = ["thread", "process"] if args.async_mode == "both" else [args.async_mode]
    for mode in modes:
        asynchronous = CheckpointManager(args.dir / f"async_{mode}", async_save=True, async_mode=mode)
        for phase, iteration in (("first", 2), ("steady", 3)):
            name = f"async_{mode}_{phase}"
            results[name] = measure_save(state, asynchronous, baseline, iteration)
            results[f"stall_ratio_{mode}_{phase}"] = results[name]["stall_s"] / results["sync"]["stall_s"]
            print(name, json.dumps(results[name]), flush=True)
        asynchronous.close()
    print(json.dumps(results, indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
