"""Watching a run, one concern per module: ``backends`` (metrics.jsonl, TensorBoard, W&B), ``step_timing`` (where a
step's time goes; throughput, MFU, memory), ``gpu_telemetry`` (NVML readings and warnings), ``affinity`` (CPU cores
near each GPU) and ``stragglers`` (ranks slower than the others).

A low layer beside ``rcm.launch``: it imports no model, distillation or training code. Import the submodules
directly; this package imports nothing.
"""
