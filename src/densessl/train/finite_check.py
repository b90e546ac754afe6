"""The record of the first non-finite loss, kept on the device so that a step never waits for the GPU.

The official loops (facebookresearch/dino @ 7c446df ``main_dino.py`` ``train_one_epoch``:
``if not math.isfinite(loss.item())``) read the loss back on every step, which makes the CPU wait for every
kernel queued so far before it may queue the next step. Here each step only queues a few tiny kernels that
remember the first step whose loss was NaN/Inf and that loss; the trainer reads the record every
``train.finite_check_every`` steps and always before writing a checkpoint, so a checkpoint is never written
after a non-finite step, and the error still names the first bad step and its loss.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

NO_STEP = -1


class FiniteLossRecord:
    """``step``: the first step whose loss was not finite on this process (``NO_STEP`` while none); ``value``:
    that loss. Both are 0-dim tensors on the training device, updated without a host synchronisation."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is not finite and no earlier step was."""
        loss = loss.detach().float().reshape(())
        first = ~torch.isfinite(loss) & (self.step == NO_STEP)
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.value = torch.where(first, loss, self.value)

    def read(self) -> tuple[int | None, float]:
        """(first bad step or None, its loss): one host synchronisation."""
        step, value = torch.stack([self.step.double(), self.value.double()]).tolist()
        return (None if step == NO_STEP else int(step)), value

    def agree(self, stop: bool, world: int) -> tuple[int | None, bool]:
        """Over every process, in one all-reduce: (the earliest bad step of any rank or None, some rank got a
        stop signal). MIN over [bad step or +inf, −stop]: the second entry is −1 when any rank has a stop."""
        key = torch.where(self.step == NO_STEP, torch.full_like(self.step, 0).double() + math.inf,
                          self.step.double())
        flags = torch.stack([key, torch.full_like(key, -1.0 if stop else 0.0)])
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        first, stops = flags.tolist()
        return (None if math.isinf(first) else int(first)), stops < 0
