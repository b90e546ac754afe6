"""`python -m densessl status`: how far a results folder is, per paper table and per protocol, with an ETA.

Each job of the plan (report/plan.py) is, from the files it leaves:

* done: its output exists (final.pt, backbone.safetensors, metrics.json, manifest.json) and Snakemake has
  no ``.snakemake/incomplete`` marker on it;
* running: a live process holds its run lock (runlock.py: the pid is alive on this host, or the lock is
  another host's), or its log (Snakemake's, or a ``densessl launch`` run's submitit log) has been written in the last ``RECENT_S`` seconds with no error in it
  (data and convert jobs take no lock; a running job logs a progress line every 30 s);
* failed: its log holds a traceback or a ``densessl <stage>: error:`` line, and it is neither done nor
  running (a preempted job, exit 3, logs no error: it is pending until its retry starts);
* pending: anything else, including a job whose dependencies are not done yet.

A published cell (or a protocol's evaluation) is done when its evaluations are done; else failed when a job
it waits on failed, running when one runs, else pending. ETA of a group: the largest remaining time of its
running jobs (the newest ``ETA`` of each one's log, less the time since that line was written) plus the
planned wall time of its pending jobs (GPU-hours over the GPUs each asks for) one after another; pending jobs
without a figure are counted in ``eta_unknown_jobs`` and left out.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from densessl.config import Config
from densessl.errors import DenseSSLError
from densessl.progress import human_duration
from densessl.report.plan import Plan, PlanJob, build_plan
from densessl.runlock import LOCK_NAME

SCHEMA = "densessl.status/1"
STATES = ("done", "running", "pending", "failed")
RECENT_S = 600
ERROR = re.compile(r"Traceback \(most recent call last\)|^densessl \S+: error:", re.MULTILINE)
ETA = re.compile(r"\bETA (\d+d\d+h|\d+h\d+m|\d+m\d+s|\d+s|unknown)\b")
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
TAIL_BYTES = 65536


def parse_duration(text: str) -> float | None:
    """``4h21m`` (progress.human_duration's format) in seconds; None for ``unknown``."""
    if text == "unknown":
        return None
    return float(sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([dhms])", text)))


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(path.stat().st_size - TAIL_BYTES, 0))
        return f.read().decode("utf-8", errors="replace")


def lock_live(directory: Path) -> bool:
    """Whether a live process holds ``directory``'s run lock (another host's lock counts as live)."""
    path = directory / LOCK_NAME
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(holder, dict):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def incomplete_outputs(*folders: Path) -> set[Path]:
    """Outputs Snakemake marks incomplete under ``<folder>/.snakemake/incomplete`` (file names: the output path,
    urlsafe base64, split into folders prefixed '@' where longer than a file name)."""
    out: set[Path] = set()
    for folder in folders:
        root = folder / ".snakemake" / "incomplete"
        if not root.is_dir():
            continue
        for marker in root.rglob("*"):
            if not marker.is_file() or marker.name == "migration_underway":
                continue
            encoded = "".join(p.lstrip("@") for p in marker.relative_to(root).parts)
            try:
                name = base64.urlsafe_b64decode(encoded.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                continue
            path = Path(name)
            out.add((path if path.is_absolute() else folder / path).resolve())
    return out


def _error_line(text: str) -> str:
    """The line that says what went wrong: a ``densessl <stage>: error:`` line, or a traceback's exception."""
    lines = text.splitlines()
    if not lines[0].startswith("Traceback"):
        return lines[0]
    for line in lines[1:]:
        if line.strip() and not line[0].isspace():
            return line
    return lines[0]


@dataclass
class JobState:
    state: str
    eta_s: float | None = None      # running: seconds left from its log's newest ETA
    reason: str = ""


def newest_log(job: PlanJob) -> Path | None:
    """The job's Snakemake log, or for a pretraining submitted by ``densessl launch`` its newest submitit log
    (``<run>/submitit/<job id>/<job id>_<task>_log.{out,err}``), whichever was written last."""
    candidates = [Path(job.log)]
    if job.kind == "pretrain" and job.lock_dir is not None:
        candidates += Path(job.lock_dir).glob("submitit/*/*_log.*")
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def job_state(job: PlanJob, incomplete: set[Path], now: float) -> JobState:
    output = Path(job.output)
    marked = output.resolve() in incomplete
    if output.is_file() and not marked:
        return JobState("done")
    log = newest_log(job)
    text = _tail(log) if log is not None else ""
    age = now - log.stat().st_mtime if log is not None else None
    live = job.lock_dir is not None and lock_live(Path(job.lock_dir))
    error = ERROR.search(text)
    if live or (age is not None and age < RECENT_S and not error):
        found = ETA.findall(text)
        eta = parse_duration(found[-1]) if found else None
        if eta is not None and age is not None:
            eta = max(eta - age, 0.0)
        return JobState("running", eta, "live run lock" if live else "log written recently")
    if error:
        return JobState("failed", reason=f"{log}: {_error_line(text[error.start():])}")
    return JobState("pending")


@dataclass
class GroupStatus:
    id: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    eta_s: float | None = None
    eta_unknown_jobs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.counts, "eta_s": None if self.eta_s is None else round(self.eta_s),
                "eta_unknown_jobs": self.eta_unknown_jobs}


def _combine(states: list[str]) -> str:
    """The state of a cell whose evaluations are not all done, from the jobs they wait on."""
    for s in ("failed", "running"):
        if s in states:
            return s
    return "pending"


def rebase(plan_: Plan, cfg: Config, results: Path) -> dict[str, PlanJob]:
    """The plan's jobs with their files under ``results`` instead of the configuration's results folder."""
    base = cfg.results

    def move(p: str | None) -> str | None:
        return None if p is None else str(results / Path(p).relative_to(base))

    return {k: replace(j, output=move(j.output), log=move(j.log), lock_dir=move(j.lock_dir))
            for k, j in plan_.jobs.items()}


@dataclass
class Status:
    results: Path
    jobs: dict[str, JobState]
    tables: list[GroupStatus]
    protocols: list[GroupStatus]
    total: GroupStatus
    failures: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "results": str(self.results), "tables": [t.as_dict() for t in self.tables],
                "protocols": [p.as_dict() for p in self.protocols], "total": self.total.as_dict(),
                "jobs": {k: {"state": s.state, "eta_s": s.eta_s, "reason": s.reason} for k, s in self.jobs.items()},
                "failures": self.failures}


def _eta(group: GroupStatus, job_ids: list[str], jobs: dict[str, PlanJob], states: dict[str, JobState]) -> None:
    running = [states[j].eta_s for j in job_ids if states[j].state == "running"]
    known = [e for e in running if e is not None]
    pending = 0.0
    unknown = sum(e is None for e in running)
    for j in job_ids:
        if states[j].state != "pending":
            continue
        job = jobs[j]
        if job.gpu_hours is None:
            unknown += 1
        elif job.gpus:
            pending += job.gpu_hours * 3600.0 / job.gpus
    group.eta_unknown_jobs = unknown
    group.eta_s = (max(known, default=0.0) + pending) if (known or pending or not unknown) else None


def build_status(cfg: Config, results: Path | None = None, now: float | None = None) -> Status:
    """The state of every planned job under ``results`` (default: the configuration's results folder)."""
    folder = Path(results) if results is not None else cfg.results
    if not folder.is_dir():
        raise DenseSSLError(f"{folder}: no such results folder; run the workflow first (snakemake, or make smoke) or "
                            f"pass --results <folder of a run, e.g. results/{cfg.preset}>")
    now = time.time() if now is None else now
    plan_ = build_plan(cfg)
    jobs = rebase(plan_, cfg, folder)
    incomplete = incomplete_outputs(Path.cwd(), *folder.resolve().parents[:3])
    states = {k: job_state(j, incomplete, now) for k, j in jobs.items()}

    def chain(root: str) -> list[str]:
        seen, stack = [], [root]
        while stack:
            j = stack.pop()
            if j not in seen:
                seen.append(j)
                stack.extend(jobs[j].needs)
        return seen

    def group(gid: str, units: list[list[str]], job_ids: list[str]) -> GroupStatus:
        g = GroupStatus(gid)
        for unit in units:  # done when its evaluations are, whatever is left upstream (deleted checkpoints)
            waiting = [j for r in unit if states[r].state != "done" for j in chain(r)]
            g.counts[_combine([states[j].state for j in waiting]) if waiting else "done"] += 1
        _eta(g, job_ids, jobs, states)
        return g

    def eval_id(protocol: str, run_id: str) -> str:
        return f"evaluate {protocol} {run_id}"

    tables = []
    by_table: dict[str, list[list[str]]] = {}
    for cell in plan_.cells:
        if cell.jobs:
            by_table.setdefault(cell.table, []).append([eval_id(j.protocol, j.run.id) for j in cell.jobs])
    for t in plan_.tables:
        tables.append(group(t.id, by_table.get(t.id, []), t.jobs))
    protocols = [group(p.id, [[eval_id(p.id, r.id)] for r in cfg.protocol_runs(p.id)], p.jobs)
                 for p in plan_.protocols]
    total = group("dag", [[j] for j in plan_.dag_total.jobs if jobs[j].kind == "evaluate"], plan_.dag_total.jobs)
    failures = [s.reason for s in states.values() if s.state == "failed"]
    return Status(folder, states, tables, protocols, total, failures)


def _fmt_eta(g: GroupStatus) -> str:
    if g.eta_s is None:
        return "unknown"
    text = human_duration(g.eta_s)
    return text + (f" (+{g.eta_unknown_jobs} jobs without a figure)" if g.eta_unknown_jobs else "")


def format_status(status: Status) -> str:
    header = ["group", *STATES, "ETA (pending jobs in series)"]
    lines = [f"status of {status.results}"]
    for title, groups in (("paper tables (published cells with a job)", status.tables),
                          ("protocols (evaluation jobs)", status.protocols + [status.total])):
        rows = [[g.id, *(str(g.counts[s]) for s in STATES), _fmt_eta(g)] for g in groups
                if sum(g.counts.values()) or g is status.total]
        lines += ["", title]
        if not rows:
            lines.append("  (none: no published cell has a job in this configuration)")
            continue
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += [fmt.format(*header)] + [fmt.format(*r) for r in rows]
    if status.failures:
        lines += ["", "failed jobs:"] + [f"  {f}" for f in status.failures]
    return "\n".join(lines)
