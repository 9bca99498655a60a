"""Stop signals become a flag that every rank agrees on at the same iteration."""
from __future__ import annotations

import json
import os
import signal

import torch.distributed as dist
import torch.multiprocessing as mp

from rcm.launch.signals import STOP_SIGNALS, StopRequest


def test_pre_timeout_and_preemption_signals_set_the_flag_and_usr1_is_left_alone():
    assert set(STOP_SIGNALS) == {signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM}
    usr1_before = signal.getsignal(signal.SIGUSR1)
    for signum in STOP_SIGNALS:
        stop = StopRequest().install()
        try:
            assert not stop.should_stop(0)
            os.kill(os.getpid(), signum)
            assert stop.should_stop(1)
            assert stop.signal_name == signal.Signals(signum).name
        finally:
            stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is usr1_before


def test_uninstall_gives_the_signals_back():
    """submitit's own USR2 handler (or the default action) is restored once training returns."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        stop = StopRequest().install()
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] and stop.local_signal is None
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_flag_is_only_read_every_check_every_iterations():
    stop = StopRequest(check_every=3).install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert [stop.should_stop(i) for i in (1, 2, 3, 4)] == [False, False, True, True]
    finally:
        stop.uninstall()


def _rank_main(rank: int, store_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    stop = StopRequest(world_size=2, check_every=1).install()
    stopped_at = None
    for iteration in range(1, 20):
        if rank == 1 and iteration == 4:
            os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled
        if stop.should_stop(iteration):
            stopped_at = iteration
            break
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"stopped_at": stopped_at, "signal": stop.signal_name, "local": stop.local_signal}, f)
    dist.destroy_process_group()


def test_ranks_agree_on_a_signal_that_reached_only_one_of_them(tmp_path):
    """Rank 0 never got the signal, yet it stops at the same iteration as rank 1 (all-reduce MAX)."""
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["stopped_at"] == results[1]["stopped_at"] == 4
    assert results[0]["signal"] == results[1]["signal"] == "SIGUSR2"
    assert results[0]["local"] is None
