"""Run a test function in several forked processes at once (racing writers, gloo ranks) and collect what they report."""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable


def run_forked(target: Callable, arguments: list[tuple], timeout_s: float = 60) -> list:
    """Call ``target(*args, results)`` in one forked process per tuple in ``arguments``; returns the one value each
    put on the ``results`` queue, in the order they arrived."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, results)) for args in arguments]
    for process in processes:
        process.start()
    try:
        return [results.get(timeout=timeout_s) for _ in processes]  # drained before join: a full pipe would block
    finally:
        for process in processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
