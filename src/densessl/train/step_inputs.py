"""Small helpers of the training step: grouping micro-batches, moving a batch to the device, reading method
logs back in one synchronisation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def group_micro_batches(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` micro-batches (the sampler yields whole groups only)."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def logs_as_floats(logs: dict[str, Any]) -> dict[str, float]:
    """Method logs as floats for the metrics file; 0-dim tensors are read back together (one synchronisation)."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in logs.items() if k not in keys}
    if keys:
        device = logs[keys[0]].device
        values = torch.stack([logs[k].detach().double().reshape(()).to(device) for k in keys]).tolist()
        out.update(zip(keys, values, strict=True))
    return {k: out[k] for k in logs}


def batch_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        moved = batch.to(device, non_blocking=True)
        return moved.contiguous(memory_format=torch.channels_last) if channels_last and moved.ndim == 4 else moved
    if isinstance(batch, dict):
        return {k: batch_to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to_device(v, device, channels_last) for v in batch)
    return batch
