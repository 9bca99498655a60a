"""Stop requests: the pre-timeout and preemption signals become a flag that the training loop polls.

Slurm sends the pre-timeout signal chosen with ``--signal`` (this toolkit: USR2, or HUP) some
minutes before the time limit, and SIGTERM when it preempts or cancels a job (then SIGKILL after the
cluster's KillWait). USR1 is left alone: NCCL may use it. The handler only records the signal; the
loop asks ``should_stop`` once per iteration, and every rank gets the same answer (an all-reduce), so
all of them finish the same step and enter the final checkpoint together.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM)


class StopRequest:
    """Records the first stop signal this process receives; ``should_stop`` agrees on it across ranks."""

    def __init__(self, world_size: int = 1, device: torch.device | str = "cpu", check_every: int = 1):
        self.world_size = world_size
        self.device = torch.device(device)
        self.check_every = check_every
        self.local_signal: int | None = None
        self.agreed_signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        """Take over the stop signals (remembering the handlers they replace); main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. in-process tests)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back to whoever had them before (submitit, the default action)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.local_signal is None:
            self.local_signal = signum
            # os.write, not logging: a signal handler may interrupt a logging call holding its lock.
            os.write(2, f"rank process {os.getpid()}: received {signal.Signals(signum).name}; "
                        "will save a checkpoint after the current iteration and stop\n".encode())

    def should_stop(self, iteration: int) -> bool:
        """True on every rank once any rank got a stop signal; a collective every ``check_every`` iterations."""
        if self.agreed_signal is not None:
            return True
        if iteration % self.check_every:
            return False
        signum = self.local_signal or 0
        if self.world_size > 1:
            # The largest signal number wins (TERM over USR2 over HUP): preemption is the most urgent.
            flag = torch.tensor([signum], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.agreed_signal = signum
        return bool(signum)

    @property
    def signal_name(self) -> str | None:
        """Name of the agreed signal ('SIGUSR2'), or None."""
        return signal.Signals(self.agreed_signal).name if self.agreed_signal else None
