"""The training loop end to end on CPU: resume equality, data parallel with gloo, bad configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm.checkpoint.manager import read_marker
from rcm.config import ConfigError, load_config
from rcm.data.shards import ShardError
from rcm.parallel.distributed import DistributedInfo
from rcm.train import Trainer, build_network, train
from rcm.training.step import set_learning_rate

REPO = Path(__file__).resolve().parents[1]


def rcm_config(root: Path, run_dir: Path, max_iters: int, extra=()):
    return load_config([
        "experiment=toy_rcm", f"run_dir={run_dir}", f"data.shards={root / 'data'}",
        f"distill.teacher_checkpoint={root / 'teacher.pth'}", "train.batch_size=2", f"train.max_iters={max_iters}",
        "distill.tangent_warmup=2", "distill.student_update_freq=2", "train.save_every=3", "train.progress_bar=false",
        "train.device=cpu", "data.shuffle_buffer=8", *extra,
    ])


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor that defines the run's future: weights, EMA, optimizer moments, RNG."""
    state = {}
    for role, network in trainer.networks().items():
        state.update({f"{role}.{k}": v for k, v in network.state_dict().items()})
        for i, (p, s) in enumerate(trainer.optimizers[role].state.items()):
            state.update({f"optim_{role}.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    state.update({f"ema.{k}": v for k, v in trainer.ema.shadow.items()})
    state["generator"] = trainer.generator.get_state()
    return state


def test_resume_is_bit_identical_to_an_uninterrupted_run(toy_setup, tmp_path):
    """2N steps straight equal N steps, a fresh process state, and N more steps resumed from the checkpoint."""
    straight = Trainer(rcm_config(toy_setup, tmp_path / "straight", 6), torch.device("cpu"), DistributedInfo())
    straight.run()

    first = Trainer(rcm_config(toy_setup, tmp_path / "resumed", 3), torch.device("cpu"), DistributedInfo())
    first.run()
    torch.manual_seed(12345)  # a restart does not share the old process's RNG
    resumed = Trainer(rcm_config(toy_setup, tmp_path / "resumed", 6), torch.device("cpu"), DistributedInfo())
    resumed.run()
    assert resumed.iteration == straight.iteration == 6
    assert resumed.student_iteration == straight.student_iteration
    assert resumed.loader.state_dict() == straight.loader.state_dict()
    a, b = full_state(straight), full_state(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differs after resume: {different[:5]}"
    # The schedule really exercised both networks and DMD.
    assert resumed.optimizers["fake_score"].state, "the fake score never stepped"


def test_distillation_starts_from_the_teacher_without_initializing_a_network(toy_setup, tmp_path, monkeypatch):
    """Student, fake score and teacher are built on the meta device and get their memory and the teacher's weights
    only after sharding (a 14B run cannot hold three full networks per rank): no initialization ever runs on real
    memory, and all three hold exactly the checkpoint's values (the release's Linear patch embedding included)."""
    from rcm.models.wan_dit import WanDiT

    initialized_on = []
    real_init = WanDiT.init_weights

    def init_weights(self):
        initialized_on.append({p.device.type for p in self.parameters()})
        real_init(self)

    monkeypatch.setattr(WanDiT, "init_weights", init_weights)
    state = torch.load(toy_setup / "teacher.pth", weights_only=True)
    release = dict(state)
    release["patch_embedding.weight"] = state["patch_embedding.weight"].flatten(1).clone()
    torch.save(release, tmp_path / "release.pth")
    trainer = Trainer(rcm_config(toy_setup, tmp_path / "run", 1, [f"distill.teacher_checkpoint={tmp_path / 'release.pth'}"]),
                      torch.device("cpu"), DistributedInfo())
    assert initialized_on == [{"meta"}]
    for role, network in (("student", trainer.student), ("fake score", trainer.fake_score), ("teacher", trainer.teacher)):
        loaded = network.state_dict()
        assert loaded.keys() == state.keys(), role
        different = [k for k in state if not torch.equal(loaded[k], state[k])]
        assert not different, f"{role} differs from the teacher checkpoint: {different[:3]}"
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


@pytest.mark.parametrize("experiment,has_fake_score", [("toy_scm", False), ("toy_dmd", True), ("toy_dcm", False)])
def test_every_baseline_starts_from_the_teacher_and_trains(toy_setup, tmp_path, experiment, has_fake_score):
    """The baselines' experiments build their networks the same way (meta, then the teacher's weights) and train."""
    teacher = torch.load(toy_setup / "teacher.pth", weights_only=True)
    cfg = rcm_config(toy_setup, tmp_path / experiment, 2, [f"experiment={experiment}"])
    trainer = Trainer(cfg, torch.device("cpu"), DistributedInfo())
    assert (trainer.fake_score is not None) == has_fake_score
    for network in (trainer.teacher, trainer.student):
        assert all(torch.equal(value, teacher[name]) for name, value in network.state_dict().items())
    trainer.run()
    assert trainer.iteration == 2
    assert not all(torch.equal(value, teacher[name]) for name, value in trainer.student.state_dict().items())


def test_interrupted_save_is_not_taken_as_latest(toy_setup, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(rcm_config(toy_setup, run_dir, 3), torch.device("cpu"), DistributedInfo()).run()
    half_written = run_dir / "checkpoints" / "iter_000000006"
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"partial")
    trainer = Trainer(rcm_config(toy_setup, run_dir, 4), torch.device("cpu"), DistributedInfo())
    assert trainer.checkpoints.latest().name == "iter_000000003"
    trainer.run()
    assert trainer.iteration == 4


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(["experiment=toy_rcm", "+train.learning_rate=1"])
    with pytest.raises(Exception, match="optim.lrr"):
        load_config(["experiment=toy_rcm", "optim.lrr=1"])


def test_bad_method_and_missing_teacher_are_named(toy_setup, tmp_path):
    with pytest.raises(ConfigError, match="distill.method"):
        load_config(["experiment=toy_rcm", "distill.method=gan"])
    cfg = rcm_config(toy_setup, tmp_path / "x", 2, ["distill.teacher_checkpoint=/nonexistent/teacher.pth"])
    with pytest.raises(FileNotFoundError, match="/nonexistent/teacher.pth"):
        train(cfg)


def test_wrong_latent_shape_names_the_sample(toy_setup, tmp_path):
    cfg = rcm_config(toy_setup, tmp_path / "x", 2, ["data.latent_shape=[4,2,4,4]"])
    with pytest.raises(ShardError, match=r"sample \d{9} in shard .*shard-\d+\.tar has shape"):
        train(cfg)


@pytest.mark.parametrize("async_save_mode", ["thread", "process"])
def test_torchrun_two_processes_gloo(toy_setup, tmp_path, async_save_mode):
    """Two ranks train and checkpoint; interval saves are written from a thread or from DCP's writer processes."""
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "rcm.train", "experiment=toy_rcm", f"run_dir={run_dir}", f"data.shards={toy_setup / 'data'}",
        f"distill.teacher_checkpoint={toy_setup / 'teacher.pth'}", "train.batch_size=2", "train.max_iters=4",
        "distill.tangent_warmup=2", "distill.student_update_freq=2", "train.save_every=2", "train.progress_bar=false",
        "train.device=cpu", f"train.async_save_mode={async_save_mode}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = run_dir / "checkpoints" / "iter_000000004"
    assert read_marker(final)["async"] is True  # written by the asynchronous path (then waited for, being the last)
    assert (final / "COMPLETE").is_file()
    assert (final / "rank_00000.pt").is_file() and (final / "rank_00001.pt").is_file()
    # The two data-parallel ranks must draw different data or noise (they are seeded by their data rank).
    states = [torch.load(final / f"rank_{r:05d}.pt", weights_only=False) for r in range(2)]
    assert states[0]["loader"] != states[1]["loader"] or states[0]["generator"].ne(states[1]["generator"]).any()


def test_two_ranks_start_from_a_dcp_teacher(toy_setup, tmp_path):
    """2 gloo ranks, FSDP over both: networks built on meta, the teacher read from a DCP checkpoint shard by shard.
    One warm-up iteration (sCM only) leaves the fake score untouched, so the saved fake score is the teacher."""
    from rcm.checkpoint.convert import pth_to_dcp
    from rcm.checkpoint.weights import load_model_weights

    pth_to_dcp(toy_setup / "teacher.pth", tmp_path / "teacher.dcp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "rcm.train",
        "experiment=toy_rcm", f"run_dir={tmp_path / 'run'}", f"data.shards={toy_setup / 'data'}",
        f"distill.teacher_checkpoint={tmp_path / 'teacher.dcp'}", "train.batch_size=2", "train.max_iters=1",
        "distill.tangent_warmup=2", "train.progress_bar=false", "train.device=cpu", "train.async_save=false",
    ]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = torch.load(toy_setup / "teacher.pth", weights_only=True)
    for role, same in (("fake_score", True), ("student", False)):
        network = build_network(load_config(["experiment=toy_rcm"]).model)
        load_model_weights(network, tmp_path / "run", prefer=role)
        equal = all(torch.equal(value, teacher[name]) for name, value in network.state_dict().items())
        assert equal == same, role


def test_context_parallel_training_matches_one_process(toy_setup, tmp_path):
    """torchrun with parallel.cp=2 (Ulysses, FSDP2 over the CP group) trains the same networks as one process:
    the CP ranks share one data stream and one noise generator, so only summation order differs."""
    common = [
        "experiment=toy_rcm", f"data.shards={toy_setup / 'data'}", f"distill.teacher_checkpoint={toy_setup / 'teacher.pth'}",
        "train.batch_size=2", "train.max_iters=3", "distill.tangent_warmup=1", "distill.student_update_freq=2",
        "train.save_every=3", "train.progress_bar=false", "train.device=cpu", "train.async_save=false",
    ]
    single = Trainer(load_config([*common, f"run_dir={tmp_path / 'single'}"]), torch.device("cpu"), DistributedInfo())
    single.run()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "rcm.train",
               *common, f"run_dir={tmp_path / 'cp'}", "parallel.cp=2", "parallel.dp_shard=1"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for role in ("student", "ema"):
        reference, sharded = build_network(single.cfg.model), build_network(single.cfg.model)
        from rcm.checkpoint.weights import load_model_weights

        load_model_weights(reference, tmp_path / "single", prefer=role)
        load_model_weights(sharded, tmp_path / "cp", prefer=role)
        for (name, a), b in zip(reference.state_dict().items(), sharded.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (role, name)


def test_lr_factor_warmup_then_linear_or_cosine_decay():
    from rcm.train import lr_factor

    assert [lr_factor(i, 4, 100) for i in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # decay from the end of warmup (iteration 4) to the last iteration (9)
    assert [round(lr_factor(i, 4, 10, "linear", 0.1), 6) for i in (3, 4, 6, 9)] == [1.0, 1.0, 0.64, 0.1]
    assert [round(lr_factor(i, 0, 5, "cosine"), 6) for i in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    assert lr_factor(50, 0, 10, "cosine", 0.2) == pytest.approx(0.2)  # past max_iters (a longer resumed run) stays at the end
    with pytest.raises(ValueError, match="unknown learning-rate decay"):
        lr_factor(0, 0, 10, "step")


def test_trainer_applies_the_decay_and_the_config_checks_it(toy_setup, tmp_path):
    cfg = rcm_config(toy_setup, tmp_path / "run", 6, ["optim.decay=linear", "optim.min_lr_ratio=0.25"])
    trainer = Trainer(cfg, torch.device("cpu"), DistributedInfo())
    for iteration, factor in ((0, 1.0), (5, 0.25)):
        trainer.iteration = iteration
        for role, optimizer in trainer.optimizers.items():
            set_learning_rate(trainer, role)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(trainer.base_lr[role] * factor)
    with pytest.raises(ConfigError, match="optim.decay must be one of none, linear, cosine"):
        rcm_config(toy_setup, tmp_path / "bad", 6, ["optim.decay=exp"])
    with pytest.raises(ConfigError, match="optim.min_lr_ratio must be in"):
        rcm_config(toy_setup, tmp_path / "bad", 6, ["optim.min_lr_ratio=2"])


def test_a_config_error_is_one_sentence_without_a_traceback(tmp_path):
    """The toolkit's own validation (not Hydra's) used to print a traceback before its sentence."""
    result = subprocess.run([sys.executable, "-m", "rcm.train", "experiment=toy_rcm", f"run_dir={tmp_path / 'run'}",
                             "train.mixed_precision=fp8"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "rcm.train: error: train.mixed_precision must be 'bf16' or 'none', got 'fp8' (set RCM_DEBUG=1 for the traceback)"]


@pytest.mark.parametrize("failure, logged", [(RuntimeError("NCCL watchdog timeout"), True),
                                             (ConfigError("data.shards: no shard"), False)])
def test_a_crash_logs_its_traceback_and_bad_input_only_its_sentence(tmp_path, monkeypatch, caplog, failure, logged):
    """Bad input ends in its one sentence (rcm.cli_errors); a crash also leaves its traceback in the log, where a
    collective timeout on a cluster must be diagnosed after the fact."""
    import rcm.train

    class Failing:
        def __init__(self, *args):
            pass

        def run(self, *args):
            raise failure

    monkeypatch.setattr(rcm.train, "Trainer", Failing)
    monkeypatch.delenv("RCM_DEBUG", raising=False)
    cfg = load_config(["experiment=toy_rcm", f"run_dir={tmp_path / 'run'}", "train.device=cpu"])
    with pytest.raises(type(failure)):
        train(cfg)
    records = [r for r in caplog.records if "rank 0 of 1 failed" in r.getMessage()]
    assert bool(records) == logged and all(r.exc_info and r.exc_info[1] is failure for r in records)
    assert not (tmp_path / "run" / "LEASE").exists()  # released on the way out
