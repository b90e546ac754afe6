"""Progress as periodic log lines: done / total, rate and ETA every few seconds.

Why not only a terminal bar: the data rule's output goes to a Snakemake log file and a SLURM job's to a file,
where a carriage-return bar is one unreadable line or nothing. A log line every ``interval`` seconds (and one
at the end) reads the same in a terminal, a log file and ``tail -f``.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("densessl.data")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts work done (bytes or items) and logs ``what: done / total (pct), rate, ETA`` every ``interval`` s."""

    def __init__(self, what: str, total: float | None, unit: str = "B", initial: float = 0.0,
                 interval: float = 10.0, logger: logging.Logger | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = float(initial)
        self.interval = interval
        self.log = logger or log
        self._start_done = self.done
        self._t0 = time.monotonic()
        self._last = self._t0

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else f"{int(n):,} {self.unit}"

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        rate_s = f"{human_bytes(rate)}/s" if self.unit == "B" else f"{rate:,.1f} {self.unit}/s"
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = human_duration((self.total - self.done) / rate) if rate > 0 else "unknown"
            return f"{self.what}: {self._fmt(self.done)} / {self._fmt(self.total)} ({pct:.1f}%), {rate_s}, ETA {eta}"
        return f"{self.what}: {self._fmt(self.done)}, {rate_s}"

    def update(self, n: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info(self.line())

    def finish(self) -> None:
        elapsed = time.monotonic() - self._t0
        self.log.info(f"{self.line()}; finished in {human_duration(elapsed)}")
