"""What the trainer's processes agree on: stopping (a signal or a non-finite loss, in one small all-reduce at
the finiteness checks), the logged loss averaged over ranks, and replicas holding identical weights.

A mixin of ``Trainer`` (train/trainer.py); on one process every collective is a no-op or a local read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from densessl.errors import DenseSSLError
from densessl.train.distributed import out_of_sync
from densessl.train.stops import NonFiniteLossError, Preempted


class RankAgreement:
    """``_barrier`` / ``_agree`` / ``_mean_over_ranks`` / ``check_replicas_in_sync`` of ``Trainer``."""

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _agree(self, it: int, force: bool = False) -> bool:
        """Stop now? On one process a stop signal is seen at once, and the finiteness record is read every
        ``finite_check_every`` steps; on several, both are agreed in one all-reduce at those steps only (every
        rank reaches the same steps, so the collective matches). ``force``: read now (before a checkpoint).
        Raises ``NonFiniteLossError`` naming the first non-finite step of any rank."""
        due = force or (it + 1) % self.cfg.finite_check_every == 0
        stop = self._stop_signal is not None
        if not due:
            return stop if self.world == 1 else False
        first, stop_any = self.finite.agree(stop, self.world)
        if first is not None:
            local_step, local_value = self.finite.read()
            where = (f"loss is {local_value}" if local_step == first else "loss is non-finite on another rank")
            self._diverged(f"{where} at step {first} (epoch {first // self.iters_per_epoch})")
        return stop_any

    def _non_finite_before(self, exc: BaseException) -> None:
        """A run that went on from a non-finite loss until its next check may fail inside the method first
        (NaN indices, an empty Sinkhorn): name the non-finite step instead of the error it caused."""
        if isinstance(exc, (NonFiniteLossError, Preempted)):
            return
        try:
            first, value = self.finite.read()
        except Exception:  # noqa: BLE001 - the device itself failed; the original error says more
            return
        if first is not None:
            self._diverged(f"loss is {value} at step {first} (epoch {first // self.iters_per_epoch}), found after "
                           f"{type(exc).__name__}: {exc}")

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        """The loss averaged over every process (a collective at log steps only): one host synchronisation."""
        total = loss.detach().double().reshape(1)
        if self.world > 1:
            dist.all_reduce(total)
        return float(total) / self.world

    def check_replicas_in_sync(self, step: int) -> None:
        """Every rank must hold the same student and teacher parameters; compared by per-tensor sums."""
        if self.world == 1:
            return
        named = [(f"student.{n}", p) for n, p in self._student().named_parameters()]
        if self.method.teacher is not None:
            named += [(f"teacher.{n}", p) for n, p in self.method.teacher.named_parameters()]
        names = out_of_sync(named, self.world)
        if names:
            raise DenseSSLError(f"after step {step} the {self.world} processes hold different weights for {names}: "
                                f"{self.method.name}.loss must run the student as self.student(...) (the DDP "
                                f"wrapper averages gradients only then), update parameters only through the "
                                f"optimiser and update_teacher, and set find_unused_parameters = True on the "
                                f"method class if some parameters get no gradient on some steps")

