"""The pieces of the training loop by concern, read by ``rcm/train.py`` (the loop and the entry point):
``state`` (networks, optimizers, EMA, data, counters; checkpoint save and resume), ``step`` (one iteration:
batch, loss, backward, update; the learning-rate schedule) and ``metrics_log`` (metrics.jsonl and progress).

Import the submodules directly; this package imports nothing.
"""
