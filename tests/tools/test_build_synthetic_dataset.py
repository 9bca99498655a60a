"""tools/build_synthetic_dataset.py: a build killed mid-shard and resumed (on another number of ranks) writes
the same bytes as an uninterrupted one, in the format the training loader reads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm.data.shards import ShardLoader
from rcm.data.toy import ToyMixture
from tests.eval.tiny_checkpoints import TINY_PRESET, write_ground_truth, write_tiny_checkpoint
from tests.helpers import load_tool as load_tool_module

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "build_synthetic_dataset.py"
NUM_SHARDS = 4


def load_tool():
    """The tool's module."""
    return load_tool_module("build_synthetic_dataset")


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """teacher.pth (tiny preset) and the toy ground truth."""
    root = tmp_path_factory.mktemp("synthetic_inputs")
    write_tiny_checkpoint(root / "teacher.pth", seed=0)
    write_ground_truth(root / "ground_truth.pt")
    return root


def build_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    """24 samples in 4 shards of 6, batches of 4 (a shard spans two batches), 2 Euler steps with CFG 2."""
    return [
        "--teacher", str(inputs / "teacher.pth"), "--model", TINY_PRESET, "--ground-truth", str(inputs / "ground_truth.pt"),
        "--out", str(out), "--num-samples", "24", "--samples-per-shard", "6", "--batch-size", "4", "--steps", "2",
        "--guidance", "2", "--seed", "5", "--device", "cpu", *extra,
    ]


@pytest.fixture(scope="module")
def complete_build(tool, inputs, tmp_path_factory) -> Path:
    """An uninterrupted build in one process (one thread, like each torchrun worker)."""
    out = tmp_path_factory.mktemp("complete")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tool.main(build_args(inputs, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def shard_paths(out: Path) -> list[Path]:
    """The complete shards of a build, in order."""
    return sorted(out.glob("shard-*.tar"))


def test_help_answers(tool, capsys):
    """--help exits cleanly and explains the format, resuming and the options; the crash flag stays hidden."""
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--samples-per-shard", "--shard-index", "--guidance", "latent.pt", "partial", "torchrun"):
        assert words in text
    assert "--stop-after-shards" not in text


def test_crashed_then_resumed_build_is_byte_identical(complete_build, inputs, tmp_path):
    """Crash after 1 shard with the 2nd shard's partial file left behind; resume with 2 torchrun ranks: the
    partial file is gone and every shard has the bytes of the uninterrupted build."""
    out = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    crashed = subprocess.run([sys.executable, str(TOOL), *build_args(inputs, out, "--stop-after-shards", "1")], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == load_tool().CRASH_EXIT_CODE, crashed.stderr[-3000:]
    assert [p.name for p in shard_paths(out)] == ["shard-000000.tar"]
    assert (out / ".shard-000001.tar.partial").is_file()

    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                              str(TOOL), *build_args(inputs, out)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 already complete" in resumed.stdout
    assert not list(out.glob(".*.partial"))
    expected = shard_paths(complete_build)
    assert len(expected) == NUM_SHARDS and [p.name for p in shard_paths(out)] == [p.name for p in expected]
    for mine, reference in zip(shard_paths(out), expected):
        assert mine.read_bytes() == reference.read_bytes(), mine.name


def test_shards_load_in_the_training_format(complete_build, inputs):
    """ShardLoader reads every sample; prompts cycle over the toy classes with their own embeddings; the directory
    also holds the ground truth and the negative embedding the toy data config expects."""
    mixture = ToyMixture.load(inputs / "ground_truth.pt")
    config = mixture.config
    loader = ShardLoader(complete_build, batch_size=24, latent_shape=config.latent_shape, text_len=config.text_len,
                         text_dim=config.text_dim, shuffle_buffer=1)
    batch = next(loader)
    assert batch["latent"].shape == (24, *config.latent_shape) and torch.isfinite(batch["latent"]).all()
    assert sorted(batch["prompt"]) == sorted(mixture.prompts * 3)
    for row, prompt in enumerate(batch["prompt"]):
        class_id = mixture.prompts.index(prompt)
        length = int(batch["embed_length"][row])
        assert torch.equal(batch["embed"][row, :length], mixture.embeddings[class_id])
    assert (complete_build / "ground_truth.pt").is_file()
    assert torch.equal(torch.load(complete_build / "negative_embedding.pt"), mixture.negative_embedding)


def test_rerun_with_other_options_is_refused(tool, complete_build, inputs, capsys):
    """Resuming into a directory built with another seed stops and names the differing option."""
    argv = build_args(inputs, complete_build)
    argv[argv.index("--seed") + 1] = "6"
    assert tool.main(argv) == 2
    assert "differing: seed" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ([1, 2, 3], "holds a list of 3 items, not a state dict of network weights"),
    ("text", "is not a torch checkpoint"),
])
def test_teacher_that_is_no_checkpoint_is_one_sentence(tool, inputs, tmp_path, capsys, content, expected):
    """A teacher .pth holding a list, or a text file: exit 2 naming the file and what it is; no shard written."""
    teacher = tmp_path / "teacher.pth"
    teacher.write_text("notes\n") if content == "text" else torch.save(content, teacher)
    argv = build_args(inputs, tmp_path / "out")
    argv[argv.index("--teacher") + 1] = str(teacher)
    assert tool.main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {teacher} {expected}")
    assert not list((tmp_path / "out").glob("shard-*.tar"))
