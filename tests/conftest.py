"""Shared pytest set-up: markers that need hardware or services skip cleanly where those are absent, and
fixtures that several test packages use."""
import shutil
import subprocess

import pytest
import torch

USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")


def slurm_unavailable_reason() -> str | None:
    """Why `slurm` tests cannot run here (no client, no controller answering, no usable node), or None."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "no Slurm here; start one with slurm/local_cluster.sh up"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the Slurm controller does not answer ({error}); start one with slurm/local_cluster.sh up"
    if "is UP" not in ping.stdout:
        detail = (ping.stdout + ping.stderr).strip().splitlines()
        return f"the Slurm controller does not answer ({detail[0] if detail else 'no output'}); slurm/local_cluster.sh up"
    if not any(state.rstrip("*~#") in USABLE_NODE_STATES for state in states.stdout.split()):
        return f"no Slurm node takes jobs (states: {states.stdout.split() or 'none'}); slurm/local_cluster.sh status"
    return None


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `slurm` tests without a responding Slurm controller."""
    has_cuda = torch.cuda.is_available()
    slurm_reason = slurm_unavailable_reason() if any("slurm" in item.keywords for item in items) else None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run it through the device tool"))
        if "slurm" in item.keywords and slurm_reason:
            item.add_marker(pytest.mark.skip(reason=slurm_reason))


@pytest.fixture(scope="session")
def toy_setup(tmp_path_factory):
    """Toy shards plus a random teacher `.pth` in the official key layout."""
    from rcm.config import load_config
    from rcm.data.toy import build_toy_dataset
    from rcm.train import build_network

    root = tmp_path_factory.mktemp("toy")
    build_toy_dataset(root / "data", num_samples=64, samples_per_shard=16, seed=0)
    cfg = load_config(["experiment=toy_teacher", f"data.shards={root / 'data'}"])
    torch.manual_seed(0)
    teacher = build_network(cfg.model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save(teacher.state_dict(), root / "teacher.pth")
    return root
