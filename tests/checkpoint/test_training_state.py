"""The Trainer's use of checkpoints: starting from another run's weights only, retention and async saves from the
config, and the checkpoint options' validation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcm.checkpoint.manager import read_marker
from rcm.config import load_config
from rcm.parallel.distributed import DistributedInfo
from rcm.train import Trainer


def config(root: Path, run_dir: Path, max_iters: int, *extra: str):
    return load_config([
        "experiment=toy_rcm", f"run_dir={run_dir}", f"data.shards={root / 'data'}",
        f"distill.teacher_checkpoint={root / 'teacher.pth'}", "train.batch_size=2", f"train.max_iters={max_iters}",
        "distill.tangent_warmup=2", "distill.student_update_freq=2", "train.save_every=2", "train.progress_bar=false",
        "train.device=cpu", "data.shuffle_buffer=8", *extra,
    ])


def test_weights_only_start_from_another_run(toy_setup, tmp_path):
    """resume_from + resume_weights_only: networks and EMA come from the other run; counters and optimizers restart;
    once the new run has a checkpoint of its own, a restart resumes from that instead."""
    source = Trainer(config(toy_setup, tmp_path / "source", 4, "train.keep_every=2", "train.keep_last=1"),
                     torch.device("cpu"), DistributedInfo())
    source.run()
    kept = sorted(p.name for p in (tmp_path / "source/checkpoints").iterdir())
    assert kept == ["iter_000000002", "iter_000000004"]  # keep_last=1 plus every 2nd
    assert read_marker(tmp_path / "source/checkpoints/iter_000000002")["async"] is True
    assert read_marker(tmp_path / "source/checkpoints/iter_000000004")["async"] is True  # the final save waited for it

    finetune_cfg = config(toy_setup, tmp_path / "finetune", 2, f"train.resume_from={tmp_path / 'source'}",
                          "train.resume_weights_only=true", "train.async_save=false")
    finetune = Trainer(finetune_cfg, torch.device("cpu"), DistributedInfo())
    assert finetune.resume()
    assert finetune.iteration == 0 and finetune.student_iteration == 0
    assert all(not optimizer.state for optimizer in finetune.optimizers.values())
    for key, value in source.student.state_dict().items():
        assert torch.equal(finetune.student.state_dict()[key], value), key
    for key, value in source.ema.shadow.items():
        assert torch.equal(finetune.ema.shadow[key], value), key
    for key, value in source.fake_score.state_dict().items():
        assert torch.equal(finetune.fake_score.state_dict()[key], value), key
    finetune.run()
    again = Trainer(finetune_cfg, torch.device("cpu"), DistributedInfo())
    assert again.resume() and again.iteration == 2  # its own checkpoint wins over resume_from


def test_weights_only_from_a_pth_initializes_the_ema_from_it(toy_setup, tmp_path):
    cfg = config(toy_setup, tmp_path / "run", 2, f"train.resume_from={toy_setup / 'teacher.pth'}", "train.resume_weights_only=true")
    trainer = Trainer(cfg, torch.device("cpu"), DistributedInfo())
    trainer.resume()
    teacher = torch.load(toy_setup / "teacher.pth", weights_only=True)
    for name, parameter in trainer.student.named_parameters():
        assert torch.equal(parameter, teacher[name]) and torch.equal(trainer.ema.shadow[name], teacher[name].float())


def test_saves_from_a_writer_process_resume_to_the_same_state(toy_setup, tmp_path):
    """train.async_save_mode=process: 4 iterations straight equal 2 + resume + 2 (weights, EMA, data position)."""
    straight = Trainer(config(toy_setup, tmp_path / "straight", 4, "train.async_save_mode=process"), torch.device("cpu"),
                       DistributedInfo())
    straight.run()
    first = Trainer(config(toy_setup, tmp_path / "resumed", 2, "train.async_save_mode=process"), torch.device("cpu"),
                    DistributedInfo())
    first.run()
    assert read_marker(tmp_path / "resumed/checkpoints/iter_000000002")["async"] is True
    second = Trainer(config(toy_setup, tmp_path / "resumed", 4, "train.async_save_mode=process"), torch.device("cpu"),
                     DistributedInfo())
    assert second.resume() and second.iteration == 2
    second.run()
    for key, value in straight.student.state_dict().items():
        assert torch.equal(second.student.state_dict()[key], value), key
    for key, value in straight.ema.shadow.items():
        assert torch.equal(second.ema.shadow[key], value), key
    assert second.loader.state_dict() == straight.loader.state_dict()


@pytest.mark.parametrize("overrides, message", [
    (["train.resume_weights_only=true"], "train.resume_weights_only needs train.resume_from"),
    (["train.resume_from=/x/teacher.pth"], "set train.resume_weights_only=true"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.async_save_mode=fork"], "train.async_save_mode must be 'thread' or 'process'"),
    (["+train.keep_evry=5"], "train.keep_evry"),
])
def test_checkpoint_options_are_validated(overrides, message):
    with pytest.raises(Exception, match=message):
        load_config(["experiment=toy_rcm", *overrides])


def saved_ema(checkpoint: Path, like: dict) -> dict:
    """The EMA entry of a training checkpoint, loaded into zeros shaped like ``like``."""
    from rcm.checkpoint.manager import CheckpointManager

    state = {"ema": {name: torch.zeros_like(value) for name, value in like.items()}}
    CheckpointManager(checkpoint.parent).load_entries(checkpoint, state)
    return state["ema"]


def test_a_rerun_replaces_a_damaged_final_checkpoint_and_all_damaged_stops_it(toy_setup, tmp_path):
    """The final checkpoint damaged after the run: a rerun resumes from the previous one, trains again and replaces
    it, ending with a latest checkpoint that verifies and holds what the first run saved. With every checkpoint
    damaged a run stops naming the files, not a silent restart from 0; train.restart_if_all_damaged=true allows it."""
    from rcm.checkpoint.layout import CheckpointCorruptError
    from rcm.checkpoint.verify import verify_checkpoint
    from tests.checkpoint.damage import flip_tensor_byte

    cfg = config(toy_setup, tmp_path / "run", 4, "train.async_save=false", "train.keep_last=2")
    first = Trainer(cfg, torch.device("cpu"), DistributedInfo())
    first.run()
    final = tmp_path / "run/checkpoints/iter_000000004"
    saved = saved_ema(final, first.ema.state_dict())
    flip_tensor_byte(final)
    rerun = Trainer(cfg, torch.device("cpu"), DistributedInfo())
    rerun.run()
    assert rerun.iteration == 4 and verify_checkpoint(final) == []
    for name, value in saved_ema(final, first.ema.state_dict()).items():
        assert torch.equal(value, saved[name]), name  # the resumed run recomputed the same state

    shards = [flip_tensor_byte(tmp_path / f"run/checkpoints/iter_00000000{i}") for i in (2, 4)]
    with pytest.raises(CheckpointCorruptError, match="every checkpoint in .* is damaged") as error:
        Trainer(cfg, torch.device("cpu"), DistributedInfo()).run()
    assert all(str(shard) in str(error.value) for shard in shards)
    starting_over = Trainer(config(toy_setup, tmp_path / "run", 4, "train.restart_if_all_damaged=true"),
                            torch.device("cpu"), DistributedInfo())
    assert starting_over.resume() is False and starting_over.iteration == 0
