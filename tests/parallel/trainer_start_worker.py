"""Run under torchrun on CUDA GPUs (tests/test_train_gpu.py): a Trainer built on the meta device and sharded over
the ranks starts every network exactly from the teacher checkpoint, the teacher in bf16, and then trains and
saves. Prints OK last.

    torchrun --nproc_per_node=2 tests/parallel/trainer_start_worker.py TOY_ROOT RUN_DIR [overrides...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from rcm.config import load_config
from rcm.parallel.distributed import init_distributed, resolve_device
from rcm.train import Trainer


def main(root: Path, run_dir: Path, overrides: list[str]) -> None:
    cfg = load_config(["experiment=toy_rcm", f"run_dir={run_dir}", f"data.shards={root / 'data'}",
                       f"distill.teacher_checkpoint={root / 'teacher.pth'}", "train.batch_size=2", "train.max_iters=4",
                       "distill.tangent_warmup=1", "distill.student_update_freq=2", "train.save_every=2",
                       "train.progress_bar=false", "train.device=cuda", *overrides])
    device = resolve_device(cfg.train.device)
    info = init_distributed(device)
    trainer = Trainer(cfg, device, info)
    teacher_state = torch.load(root / "teacher.pth", weights_only=True)
    for role, network in (("student", trainer.student), ("fake_score", trainer.fake_score), ("teacher", trainer.teacher)):
        for name, parameter in network.named_parameters():
            assert isinstance(parameter, DTensor), f"{role}.{name} is not sharded"
            full = parameter.full_tensor()
            expected = teacher_state[name].to(device=full.device, dtype=full.dtype).reshape(full.shape)
            assert torch.equal(full, expected), f"{role}.{name} does not hold the teacher's weights"
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}
    trainer.run()
    assert trainer.iteration == 4
    if info.is_main:
        print("OK")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
