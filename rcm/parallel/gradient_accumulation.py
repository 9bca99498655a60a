"""Gradient accumulation over micro-batches, with the cross-rank gradient reduction only after the last one."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from rcm.parallel.fsdp import set_gradient_sync


def split_micro_batches(batch: dict[str, Any], num_micro_batches: int) -> list[dict[str, Any]]:
    """Split every tensor of ``batch`` along dim 0 into ``num_micro_batches`` equal parts (other values are shared)."""
    sizes = {value.shape[0] for value in batch.values() if torch.is_tensor(value)}
    if len(sizes) != 1:
        raise ValueError(f"a batch to split into micro-batches needs tensors of one batch size; got sizes {sorted(sizes)}.")
    (size,) = sizes
    if size % num_micro_batches:
        raise ValueError(f"train.batch_size={size} is not divisible by parallel.grad_accumulation={num_micro_batches}; "
                         "make the batch a multiple of the number of micro-batches.")
    parts = size // num_micro_batches
    return [{key: value[i * parts : (i + 1) * parts] if torch.is_tensor(value) else value for key, value in batch.items()}
            for i in range(num_micro_batches)]


def backward_micro_batches(network: nn.Module, micro_batches: list[Any], loss_of: Callable[[Any], Any]) -> list[Any]:
    """Backpropagate ``loss_of(micro_batch).loss / n`` for each of the n micro-batches into ``network``'s gradients.

    The gradients end as those of the mean loss over the micro-batches. With FSDP2 the reduce-scatter
    runs only in the last backward (earlier ones accumulate unsharded gradients locally); returns what
    ``loss_of`` returned for each micro-batch (e.g. the distiller's StepResult, for logging).
    """
    results = []
    count = len(micro_batches)
    try:
        for index, micro_batch in enumerate(micro_batches):
            set_gradient_sync(network, index == count - 1)
            result = loss_of(micro_batch)
            (result.loss / count).backward()
            results.append(result)
    finally:
        set_gradient_sync(network, True)
    return results


__all__ = ["split_micro_batches", "backward_micro_batches"]
