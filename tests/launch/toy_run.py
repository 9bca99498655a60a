"""A small rCM run on the toy data for launch tests: the Hydra overrides and its final state."""
from __future__ import annotations

from pathlib import Path

import torch


def toy_overrides(toy_root: Path, max_iters: int, save_every: int, batch_size: int = 2) -> list[str]:
    """Hydra overrides of a tiny, fast, deterministic rCM run (sCM + DMD + critic) on the CPU."""
    return [
        "experiment=toy_rcm", f"data.shards={toy_root / 'data'}", f"distill.teacher_checkpoint={toy_root / 'teacher.pth'}",
        f"train.batch_size={batch_size}", f"train.max_iters={max_iters}", f"train.save_every={save_every}",
        "distill.tangent_warmup=2", "distill.student_update_freq=2", "train.progress_bar=false", "train.device=cpu",
        "data.shuffle_buffer=8", "launch.heartbeat_every_s=0",
    ]


def final_state(run_dir: Path, overrides: list[str]) -> tuple[int, dict[str, torch.Tensor]]:
    """(iteration, every tensor of the training state) of the run directory's latest checkpoint, loaded in this process."""
    from rcm.config import load_config
    from rcm.parallel.distributed import DistributedInfo
    from rcm.train import Trainer

    trainer = Trainer(load_config([*overrides, f"run_dir={run_dir}"]), torch.device("cpu"), DistributedInfo())
    latest = trainer.checkpoints.latest()
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    trainer.resume(latest)
    state = {}
    for role, network in trainer.networks().items():
        state.update({f"{role}.{k}": v for k, v in network.state_dict().items()})
        for i, moments in enumerate(trainer.optimizers[role].state.values()):
            state.update({f"optim_{role}.{i}.{k}": torch.as_tensor(v) for k, v in moments.items()})
    state.update({f"ema.{k}": v for k, v in trainer.ema.shadow.items()})
    return trainer.iteration, state


def rank_states(checkpoint: Path) -> list[dict]:
    """Each rank's saved RNG / data position / counters, without the config (it names the run directory)."""
    states = []
    for path in sorted(checkpoint.glob("rank_*.pt")):
        state = torch.load(path, weights_only=False)
        state.pop("config", None)
        states.append(state)
    return states


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical tensors under identical names."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def same_value(a, b) -> bool:
    """Equality that looks inside dicts and lists and compares tensors exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b
