"""Samples while training: at the start and every train.sample_every iterations the student and its EMA are scored
against the toy ground truth and plotted, into metrics.jsonl, TensorBoard (scalars and the image) and
<run_dir>/samples/; a failing draw is counted and training goes on; bad settings are one sentence."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from rcm.config import ConfigError, validate_config
from rcm.parallel.distributed import DistributedInfo
from rcm.train import Trainer
from rcm.training import samples as samples_module
from tests.test_train import rcm_config


def test_samples_at_the_start_and_every_n_iterations_reach_every_backend(toy_setup, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    # Fewer samples and projections than a run's: those take half a minute on a busy CI core.
    monkeypatch.setattr(samples_module, "SLICED_WASSERSTEIN_PROJECTIONS", 8)
    monkeypatch.setattr(samples_module, "SAMPLES_PER_CLASS", 4)
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cfg = rcm_config(toy_setup, run_dir, 2, ["train.sample_every=2", "train.log_every=5",
                                             "logging.backends=[jsonl,tensorboard]"])
    trainer = Trainer(cfg, torch.device("cpu"), DistributedInfo())
    trainer.run()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 2]
    for line in lines:
        for network in ("student", "ema"):
            for steps in (1, 2, 4):
                assert 0 <= line[f"samples/{network}_{steps}step/precision"] <= 1
                assert line[f"samples/{network}_{steps}step/sliced_wasserstein"] >= 0
        assert line["samples/failures"] == 0
    # At the start the EMA is the student: the same weights, the same noise, the same samples.
    assert lines[0]["samples/student_2step/mode_kl"] == lines[0]["samples/ema_2step/mode_kl"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["iter_000000000.png", "iter_000000002.png"]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [image.step for image in events.Images("samples/toy")] == [0, 2]
    assert [s.step for s in events.Scalars("samples/ema_4step/recall")] == [0, 2]
    # Sampling the EMA borrows the student's parameters and gives them back.
    own = {name: parameter.clone() for name, parameter in trainer.student.named_parameters()}
    assert any(not torch.equal(own[name], trainer.ema.shadow[name]) for name in own)
    with samples_module.ema_weights(trainer) as network:
        assert all(torch.equal(parameter, trainer.ema.shadow[name]) for name, parameter in network.named_parameters())
    assert all(torch.equal(parameter, own[name]) for name, parameter in trainer.student.named_parameters())


def test_a_failing_draw_is_counted_and_training_goes_on(toy_setup, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr(samples_module, "sample_student", broken)
    run_dir = tmp_path / "run"
    trainer = Trainer(rcm_config(toy_setup, run_dir, 2, ["train.sample_every=1", "train.log_every=1"]),
                      torch.device("cpu"), DistributedInfo())
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("rcm.train").addHandler(handler)
    try:
        trainer.run()
    finally:
        logging.getLogger("rcm.train").removeHandler(handler)
    assert trainer.iteration == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["iteration"], line["samples/failures"]) for line in lines] == [(0, 1), (1, 2), (2, 3)]
    failures = [message for message in warnings if "drawing samples failed" in message]
    assert len(failures) == 3 and "RuntimeError: out of memory while sampling" in failures[0]


@pytest.mark.parametrize("overrides,message", [
    (["train.sample_every=0"], "train.sample_every must be a positive whole number of iterations"),
    (["train.sample_every=10", "data.ground_truth=null"], "train.sample_every draws toy samples and needs data.ground_truth"),
    (["train.sample_every=10", "distill.method=flow_matching"], "teacher pretraining (distill.method=flow_matching) has none"),
])
def test_bad_sampling_settings_are_one_sentence(toy_setup, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        validate_config(rcm_config(toy_setup, tmp_path, 2, overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def _draw_on_rank(rank: int, world_size: int, root: str, run_dir: str, init_file: str, results) -> None:
    import torch.distributed as dist

    samples_module.SAMPLES_PER_CLASS, samples_module.SLICED_WASSERSTEIN_PROJECTIONS = 4, 8
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from pathlib import Path

        cfg = rcm_config(Path(root), Path(run_dir), 2, ["train.sample_every=2"])
        trainer = Trainer(cfg, torch.device("cpu"), DistributedInfo(rank, world_size, rank))
        drawn = samples_module.TrainingSamples(trainer)
        results.put((rank, drawn.classes, drawn.draw(0)[0]))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def test_two_ranks_split_the_classes_and_score_what_one_rank_scores(toy_setup, tmp_path):
    """Each rank draws its share of the classes (the same count, so sharded networks stay in step) and the main
    rank scores them all: the 1-step samples, which depend on each class's seed alone, score as on one rank."""
    from tests.forked import run_forked

    [(_, _, alone)] = run_forked(_draw_on_rank, [(0, 1, str(toy_setup), str(tmp_path / "one"), "")], timeout_s=60)
    both = {rank: (classes, logs) for rank, classes, logs in run_forked(
        _draw_on_rank, [(rank, 2, str(toy_setup), str(tmp_path / "two"), str(tmp_path / "init")) for rank in range(2)],
        timeout_s=60)}
    assert both[0][0] == [0, 2, 4, 6] and both[1][0] == [1, 3, 5, 7] and both[1][1] == {}
    for metric in ("precision", "recall", "mode_kl", "sliced_wasserstein"):
        key = f"samples/student_1step/{metric}"
        assert both[0][1][key] == pytest.approx(alone[key]), key
    assert both[0][1]["samples/failures"] == 0
