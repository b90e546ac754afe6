"""One line per stage process with its CPU time, so a finished DAG says where its CPU went.

Why CPU and not wall time: the smoke DAG runs two jobs side by side on two cores (and CI machines are shared),
so a job's wall time depends on its neighbours while its user+sys time does not. ``start-up`` is the CPU the
process spent before the stage's own work began (interpreter, imports, configuration), the cost every one of
the DAG's jobs pays; ``benchmarks/smoke_jobs.py`` reads these lines back from the stage logs.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass
from typing import TextIO

_WALL_START = time.monotonic()
_marks: dict[str, float] = {}

LINE_PREFIX = "densessl cpu:"
_FIELD = re.compile(r"(\w+)=(\S+)")


def process_cpu() -> float:
    """User+sys seconds of this process and of the children it has waited for (torchrun's workers, toolkits'
    helper processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def mark(name: str) -> None:
    """Remember the CPU used so far under ``name`` (the first mark of a name wins)."""
    _marks.setdefault(name, process_cpu())


def cpu_line(stage: str) -> str:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    startup = _marks.get("startup", total)
    return (f"{LINE_PREFIX} stage={stage} startup_s={startup:.2f} work_s={total - startup:.2f} cpu_s={total:.2f} "
            f"user_s={own.ru_utime + children.ru_utime:.2f} sys_s={own.ru_stime + children.ru_stime:.2f} "
            f"children_s={children.ru_utime + children.ru_stime:.2f} wall_s={time.monotonic() - _WALL_START:.2f}")


def report(stage: str, stream: TextIO | None = None) -> None:
    print(cpu_line(stage), file=stream or sys.stderr, flush=True)


@dataclass(frozen=True)
class CpuRecord:
    """A parsed ``densessl cpu:`` line."""

    stage: str
    startup_s: float
    work_s: float
    cpu_s: float
    wall_s: float


def parse_line(line: str) -> CpuRecord | None:
    """The record of a ``densessl cpu:`` line, or None for any other line."""
    if not line.startswith(LINE_PREFIX):
        return None
    fields = dict(_FIELD.findall(line[len(LINE_PREFIX):]))
    try:
        return CpuRecord(fields["stage"], float(fields["startup_s"]), float(fields["work_s"]),
                         float(fields["cpu_s"]), float(fields["wall_s"]))
    except (KeyError, ValueError):
        return None
