"""Shared pytest set-up: markers that need hardware or services skip cleanly where those are absent."""
import shutil

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `slurm` tests without a responding Slurm controller."""
    has_cuda = torch.cuda.is_available()
    has_slurm = shutil.which("sinfo") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run it through the device tool"))
        if "slurm" in item.keywords and not has_slurm:
            item.add_marker(pytest.mark.skip(reason="no Slurm here; start one with slurm/local_cluster.sh up"))
