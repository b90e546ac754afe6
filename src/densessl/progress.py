"""Progress as plain log lines: step/total, rate, ETA, every few seconds, at the first step and at the end.

Why not only a terminal bar: Snakemake sends each stage's stdout and stderr to its log file, and a SLURM job's
output goes to a file, where a carriage-return bar is one unreadable line (or nothing until the stage ends).
A line such as

    pretrain dino step 1200/50000 (2.4 %) · 3.1 it/s · 41.5 img/s · elapsed 6m32s · ETA 4h21m · epoch 3/100 · loss 4.123

reads the same in a log file, ``tail -f`` and ``grep``. Where a loop also has a tqdm bar (``bar=True``), the bar
is drawn when stderr is a terminal and the lines are logged when it is not, so an interactive run shows one
of the two, never both interleaved.

The interval is ``DENSESSL_PROGRESS_INTERVAL`` seconds (default 30; ``0`` logs every update, ``inf`` none),
read when a :class:`Progress` starts; a caller may pass its own ``interval``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from densessl.errors import ConfigError

INTERVAL_ENV = "DENSESSL_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
SEP = " · "
log = logging.getLogger("densessl.progress")
T = TypeVar("T")


def progress_interval(value: float | None = None) -> float:
    """Seconds between progress lines: ``value`` when given, else ``$DENSESSL_PROGRESS_INTERVAL``, else 30."""
    if value is None:
        raw = os.environ.get(INTERVAL_ENV, "").strip()
        if not raw:
            return DEFAULT_INTERVAL
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not value >= 0:
            raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected seconds between progress lines, a number >= 0 "
                              f"(e.g. 30; 0 logs every step, inf none); set it so or unset it")
    if not value >= 0:
        raise ConfigError(f"progress interval {value!r}: must be a number of seconds >= 0")
    return float(value)


def human_bytes(n: float) -> str:
    """Decimal units, as the datasets' published sizes (1 GB = 10^9 bytes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_duration(seconds: float) -> str:
    """``42s``, ``6m32s``, ``4h21m``, ``3d04h``: two units at most, as precise as an ETA deserves."""
    if not math.isfinite(seconds):
        return "unknown"
    s = int(round(max(seconds, 0.0)))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _value(v: Any) -> str:
    """An extra field's value: ``(3, 100)`` as ``3/100``, floats with four significant digits (small ones, such
    as a learning rate, in scientific notation)."""
    if isinstance(v, tuple) and len(v) == 2:
        return f"{v[0]}/{v[1]}"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    return str(v)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Progress:
    """Counts work done and logs one line every ``interval`` seconds, at the first update and at :meth:`finish`.

    ``unit="B"`` counts bytes (sizes and MB/s); any other unit is a count shown as ``<unit> done/total`` with
    its rate in it/s (``unit=""`` when ``what`` already ends with the noun). ``items_per_step`` (or ``items=`` in :meth:`update`) adds an item rate, e.g. images per
    second from the batch size. Keyword fields given to :meth:`update` (epoch, loss, lr) are appended to the
    line as the latest values. The rate is measured from the first update on, so start-up (workers, the first
    batch, compilation) does not skew the ETA.
    """

    def __init__(self, what: str, total: float | None, *, unit: str = "step", initial: float = 0,
                 items_per_step: float | None = None, item_unit: str = "img", interval: float | None = None,
                 logger: logging.Logger | None = None, bar: bool = False, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = self._start_done = float(initial)
        self.items_per_step, self.item_unit = items_per_step, item_unit
        self.items = 0.0
        self.interval = progress_interval(interval)
        self.log = logger or log
        self.clock = clock
        self.info: dict[str, Any] = {}
        self._t0 = clock()
        self._last = self._t0
        self._first: tuple[float, float, float] | None = None  # (time, done, items) after the first update
        self._bar: Any = None
        tty = _stderr_is_tty()
        if bar and enabled and tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=what, leave=False, dynamic_ncols=True,
                             unit="B" if unit == "B" else "it", unit_scale=unit == "B")
        self.lines = enabled and math.isfinite(self.interval) and not (bar and tty)

    # ------------------------------------------------------------------------------------------ counting
    def update(self, n: float = 1, *, items: float | None = None, **info: Any) -> None:
        """``n`` more units done (``items`` more items, when the item count varies); ``info``: latest fields."""
        self.done += n
        self.items += items if items is not None else n * (self.items_per_step or 0.0)
        self.info.update(info)
        if self._bar is not None:
            if info:
                self._bar.set_postfix_str(SEP.join(f"{k} {_value(v)}" for k, v in self.info.items()), refresh=False)
            self._bar.update(n)
        if not self.lines:
            return
        now = self.clock()
        if self._first is None:
            self._first = (now, self.done, self.items)
            self._emit(now)
        elif now - self._last >= self.interval:
            self._emit(now)

    def _emit(self, now: float, suffix: str = "") -> None:
        self._last = now
        self.log.info(self.line(now) + suffix)

    # ------------------------------------------------------------------------------------------ the line
    def _rates(self, now: float) -> tuple[float, float]:
        """(units/s, items/s) from the first update on; from the start while only one update is done."""
        if self._first is not None and now > self._first[0] and self.done > self._first[1]:
            dt = now - self._first[0]
            return (self.done - self._first[1]) / dt, (self.items - self._first[2]) / dt
        dt = max(now - self._t0, 1e-9)
        return (self.done - self._start_done) / dt, self.items / dt

    def _count(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else f"{int(n)}"

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        rate, item_rate = self._rates(now)
        if self.unit == "B":
            parts = [f"{self.what} {self._count(self.done)}" + (f"/{self._count(self.total)}" if self.total else "")]
        else:
            unit = f" {self.unit}" if self.unit else ""
            parts = [f"{self.what}{unit} {self._count(self.done)}" + (f"/{self._count(self.total)}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.1f} %)"
        fields = [f"{human_bytes(rate)}/s" if self.unit == "B" else f"{rate:.3g} it/s"]
        if self.items_per_step is not None or self.items:
            fields.append(f"{item_rate:.1f} {self.item_unit}/s")
        fields.append(f"elapsed {human_duration(now - self._t0)}")
        if self.total:
            left = max(self.total - self.done, 0.0)
            fields.append(f"ETA {human_duration(left / rate) if rate > 0 else 'unknown'}" if left else "ETA 0s")
        fields += [f"{k} {_value(v)}" for k, v in self.info.items()]
        return SEP.join(parts + fields)

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, **info: Any) -> None:
        """The closing line (``done in ...``), whatever the interval; closes the bar."""
        self.info.update(info)
        self.close()
        if self.lines:
            now = self.clock()
            self._emit(now, f"{SEP}done in {human_duration(now - self._t0)}")

    def close(self) -> None:
        """Close the bar without a closing line (the loop was left by an exception or a stop signal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()


def track(iterable: Iterable[T], what: str, total: int | None = None,
          items_of: Callable[[T], float] | None = None, **kwargs: Any) -> Iterator[T]:
    """Iterate ``iterable`` with a :class:`Progress`: one update per item, after the loop body has run on it
    (``total`` defaults to its length; ``items_of(item)``, e.g. a batch's image count, gives the item rate)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    progress = Progress(what, total, **kwargs)
    completed = False
    try:
        for item in iterable:
            yield item
            progress.update(1, items=None if items_of is None else items_of(item))
        completed = True
    finally:
        if completed:
            progress.finish()
        else:
            progress.close()
