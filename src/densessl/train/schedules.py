"""Per-iteration schedules.

Matches DINO ``utils.cosine_scheduler`` (facebookresearch/dino @ 7c446df ``utils.py``): linear warm-up
from ``start_warmup_value`` over ``warmup_epochs``, then ``final + 0.5 (base - final)(1 + cos(pi t / T))``,
evaluated once per iteration. Used for lr, weight decay and teacher momentum alike.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: float = 0,
                    start_warmup_value: float = 0.0) -> np.ndarray:
    warmup_iters = int(round(warmup_epochs * iters_per_epoch))
    total = epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(total - warmup_iters)
    denom = max(len(steps), 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / denom))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total, (len(schedule), total)
    return schedule


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up then constant (DINO ``DINOLoss.__init__``)."""
    warm = np.linspace(warmup_temp, temp, warmup_epochs) if warmup_epochs > 0 else np.array([])
    return np.concatenate((warm, np.full(max(epochs - warmup_epochs, 0), temp)))[:epochs]
