"""slurm/local_cluster.sh refuses bad arguments in one sentence and a non-zero exit, before it touches anything."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "local_cluster.sh"


@pytest.mark.parametrize("arguments, sentence", [
    (["up", "--nodes", "0"], "--nodes '0' is not a positive number of nodes"),
    (["up", "--nodes", "two"], "--nodes 'two' is not a positive number of nodes"),
    (["up", "--nodes", "9"], "--nodes 9: this machine's multi-node cluster holds at most 8 nodes"),
    (["up", "--nodes"], "--nodes needs a number"),
    (["up", "--node=2"], "unknown option '--node=2' (usage: up [--nodes N])"),
    (["down", "--all"], "unknown option '--all' (usage: down [--multi-node])"),
    (["node-kill", "x"], "node number 'x' is not a number (node nK is given as K)"),
])
def test_bad_arguments_end_in_one_sentence(arguments, sentence):
    result = subprocess.run([str(SCRIPT), *arguments], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"local_cluster: {sentence}"], result.stderr
    assert result.stdout == ""


def test_unknown_verb_prints_the_usage():
    result = subprocess.run([str(SCRIPT), "restart"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith("usage:") and "up [--nodes N]" in result.stderr
