"""Termination signals for training loops with DataLoader workers.

SLURM's time limit and preemption, ``timeout``, Snakemake's shutdown and a terminal's Ctrl-C signal the whole
process group, DataLoader workers included. torch installs a SIGTERM handler in each worker that ends it
(``torch/csrc/DataLoader.cpp``, ``handler_SIGTERM``), so by default the main process dies with "DataLoader
worker ... killed by signal" before it can checkpoint. Workers therefore ignore the stop signals
(:func:`ignore_stop_signals`, passed as ``worker_init_fn``, which runs after torch's own handlers are set) and
only the main process reacts: it records the signal (:class:`StopSignals`), finishes the step, writes its
checkpoint and exits with the requeue code. Workers still exit when the main process closes the loader, and
on their own when it dies (torch's worker watchdog polls the parent pid); SIGKILL still stops them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` for every DataLoader of a checkpointing loop: leave the stop signals to the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR1 only record the signal, so the loop can save its state at the
    next step boundary and stop; the previous handlers are restored on exit. Inactive (nothing to save, or not
    the main thread, where handlers cannot be installed) it does nothing and ``received`` stays None."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, active: bool = True) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if self.active:
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *_exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None
