"""Metrics backends: TensorBoard events read back with TensorBoard's own reader, W&B offline files, a resumed run
that has each iteration once, a failing backend that leaves metrics.jsonl going, and bad input in one sentence."""
from __future__ import annotations

import json
import logging
import sys

import pytest

from rcm.config import ConfigError, load_config
from rcm.observe.backends import JsonLinesBackend, TensorBoardBackend, open_backends


def tensorboard_steps(directory, tag: str) -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them (its reader applies the purge of a restarted writer)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def jsonl_iterations(run_dir) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_appends_to_jsonl_and_tensorboard_with_each_iteration_once(tmp_path):
    """A launch logged 1..5 but its last checkpoint is at 3: the next launch, resumed at 3, logs 4..6 and both
    backends show 1..6 once, the later launch's values for 4 and 5."""
    pytest.importorskip("tensorboard")
    first = open_backends(["tensorboard"], tmp_path, None, resume_iteration=0)
    for iteration in range(1, 6):
        first.write(iteration, {"loss/total": 1.0, "role": "student"})
    first.close()
    second = open_backends(["jsonl", "tensorboard"], tmp_path, None, resume_iteration=3)
    assert second.names == ["jsonl", "tensorboard"]
    for iteration in range(4, 7):
        second.write(iteration, {"loss/total": 2.0, "role": "student"})
    second.close()
    assert jsonl_iterations(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(tmp_path / "tensorboard", "loss/total") == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss/total"] for line in lines] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0] and lines[0]["role"] == "student"


def test_a_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "a": 1}\n{"iteration": 2, "a"')
    backend = JsonLinesBackend(tmp_path, resume_iteration=2)
    backend.write(3, {"a": 3})
    backend.close()
    assert jsonl_iterations(tmp_path) == [1, 3]


def test_a_failing_backend_is_disabled_with_one_warning_and_jsonl_goes_on(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    backends = open_backends(["tensorboard"], tmp_path, None, resume_iteration=0)
    tensorboard = next(b for b in backends.backends if isinstance(b, TensorBoardBackend))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    tensorboard.writer.add_scalar = disk_full
    with caplog.at_level(logging.WARNING, logger="rcm.observe"):
        for iteration in range(1, 4):
            backends.write(iteration, {"loss/total": 1.0})
    backends.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0] and "No space left" in warnings[0]
    assert backends.names == [] and jsonl_iterations(tmp_path) == [1, 2, 3]


def test_a_backend_that_cannot_start_is_disabled_and_jsonl_starts(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    (tmp_path / "tensorboard").write_text("a file where the event directory should be")
    with caplog.at_level(logging.WARNING, logger="rcm.observe"):
        backends = open_backends(["jsonl", "tensorboard"], tmp_path, None, resume_iteration=0)
    assert backends.names == ["jsonl"] and "tensorboard could not start" in caplog.text
    backends.write(1, {"a": 1.0})
    backends.close()
    assert jsonl_iterations(tmp_path) == [1]


def test_wandb_offline_keeps_one_run_id_across_a_requeue(tmp_path, monkeypatch):
    """No account: WANDB_MODE=offline writes the run under <dir>/wandb; the resumed launch reuses its id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for resume_iteration, iterations in ((0, (1, 2)), (2, (3,))):
        backends = open_backends(["wandb"], tmp_path, tmp_path / "logs", resume_iteration, run_name="toy")
        assert backends.names == ["jsonl", "wandb"]
        for iteration in iterations:
            backends.write(iteration, {"loss/total": float(iteration)})
        backends.close()
    run_id = (tmp_path / "logs" / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "logs" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all(list(run.glob("*.wandb")) for run in runs)
    assert jsonl_iterations(tmp_path) == [1, 2, 3]


@pytest.mark.parametrize("override,key", [
    ("logging.backends=[jsonl,mlflow]", "logging.backends has unknown backend 'mlflow'"),
    ("logging.telemetry_every=-5", "logging.telemetry_every must be a whole number"),
    ("logging.straggler_every=-1", "logging.straggler_every must be a whole number"),
    ("logging.straggler_factor=0.5", "logging.straggler_factor must be more than 1"),
])
def test_bad_logging_config_is_one_sentence_naming_the_key(override, key):
    from rcm.config import validate_config

    with pytest.raises(ConfigError) as error:
        validate_config(load_config(["experiment=toy_rcm", "data.shards=x", "distill.teacher_checkpoint=t.pth", override]))
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("backend,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_backend_whose_package_is_missing_is_named(monkeypatch, backend, package):
    from rcm.config import validate_config

    monkeypatch.setitem(sys.modules, package, None)  # find_spec then reports it missing
    with pytest.raises(ConfigError, match=rf"logging.backends asks for {backend} but the {package} package is not installed"):
        validate_config(load_config(["experiment=toy_rcm", "data.shards=x", "distill.teacher_checkpoint=t.pth",
                                     f"logging.backends=[jsonl,{backend}]"]))


def test_an_unwritable_log_directory_is_named(tmp_path):
    from rcm.config import validate_config

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"^logging.dir=.*a_file/logs cannot be written: .*a_file is not a directory$"):
        validate_config(load_config(["experiment=toy_rcm", "data.shards=x", "distill.teacher_checkpoint=t.pth",
                                     "logging.backends=[tensorboard]", f"logging.dir={tmp_path / 'a_file' / 'logs'}"]))
