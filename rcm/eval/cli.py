"""What the evaluation and data-generation command lines share: the help layout and the run on every rank."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from rcm.cli_errors import debug_enabled
from rcm.parallel.distributed import DistributedInfo, init_distributed, resolve_device, shutdown_distributed


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module doc as written, and each option's default where it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def run_on_every_rank(work: Callable[[DistributedInfo, torch.device], int], device_name: str) -> int:
    """Join the process group (torchrun, Slurm tasks; nothing in one process), run `work`, leave the group.

    A ValueError or FileNotFoundError is a problem with the user's inputs: it is printed as one line and the
    exit status is 2, instead of a traceback per rank.
    """
    device = resolve_device(device_name)
    already_initialized = dist.is_initialized()  # a caller's process group is the caller's to destroy
    info = init_distributed(device)
    try:
        return work(info, device)
    except (ValueError, FileNotFoundError) as error:
        if debug_enabled():  # RCM_DEBUG=1
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if not already_initialized:
            shutdown_distributed()
