"""The two ways a training run stops early: a non-finite loss or weights (an error naming the step) and a stop
signal (after the checkpoint is written; the caller exits with ``REQUEUE_EXIT_CODE``)."""

from __future__ import annotations

from densessl.errors import DenseSSLError


class NonFiniteLossError(DenseSSLError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint is written when SIGTERM/SIGUSR1 arrived."""
