"""`python -m densessl plan`: what the papers' tables need before anything is launched.

Per paper table: the distinct DAG jobs that fill its cells (each cell's evaluation, the convert job it reads,
the pretraining behind that, the data jobs of both), their GPU-hours where a figure exists (job_costs names
it; a job without one is counted in ``gpu_hours_unknown_jobs`` and left out of the sum), their disk, and the
table's published numbers: ``published_total`` = ``published_matched`` (a DAG job fills the cell) +
``published_explained`` (no job; the cell lists why). ``total`` counts each job once although tables share
jobs (a pretraining feeds many tables), so it is less than the sum over tables. ``protocols`` groups every
job of the DAG by evaluation protocol: at smoke scale no published cell has a job (synthetic data), and these
groups are the plan.

JSON schema ``densessl.plan/1``: ``{schema, preset, tables: [group], protocols: [group], total: group,
dag_total: group, jobs: {id: job}}``; a group is ``{id, title, jobs: [job id], gpu_hours,
gpu_hours_unknown_jobs, disk_bytes}`` plus, for tables and ``total``, ``published_total``,
``published_matched``, ``published_explained``; a job is :class:`PlanJob`'s fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from densessl.config import EVALUATIONS, Config, Run
from densessl.progress import human_bytes
from densessl.report import job_costs
from densessl.report.paper_tables import CellPlan, load_tables, plan

SCHEMA = "densessl.plan/1"
CPU_JOB = "CPU job: no GPU-hours"


@dataclass(frozen=True)
class PlanJob:
    id: str                     # "<kind> <target>", e.g. "pretrain dino/vit-s16-imagenet"
    kind: str                   # data | pretrain | convert | evaluate
    output: str                 # the file that marks it done
    log: str                    # its Snakemake log
    lock_dir: str | None        # the folder whose run lock a live process holds (pretrain, evaluate)
    gpus: int                   # GPUs the job asks for (0: CPU)
    gpu_hours: float | None     # None: no figure (see source)
    source: str                 # the figure used, or why there is none
    disk_bytes: int
    disk_source: str
    needs: tuple[str, ...] = ()  # the jobs whose outputs it reads
    detail: str = ""            # how the figure becomes its GPU-hours

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Group:
    id: str
    title: str
    jobs: list[str] = field(default_factory=list)
    gpu_hours: float = 0.0
    gpu_hours_unknown_jobs: int = 0
    disk_bytes: int = 0
    published: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "title": self.title, "jobs": self.jobs,
                               "gpu_hours": round(self.gpu_hours, 2),
                               "gpu_hours_unknown_jobs": self.gpu_hours_unknown_jobs, "disk_bytes": self.disk_bytes}
        if self.published is not None:
            out.update({f"published_{k}": v for k, v in self.published.items()})
        return out


@dataclass
class Plan:
    preset: str
    jobs: dict[str, PlanJob]
    tables: list[Group]
    protocols: list[Group]
    total: Group
    dag_total: Group
    cells: list[CellPlan]

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "preset": self.preset, "tables": [t.as_dict() for t in self.tables],
                "protocols": [p.as_dict() for p in self.protocols], "total": self.total.as_dict(),
                "dag_total": self.dag_total.as_dict(), "jobs": {k: j.as_dict() for k, j in self.jobs.items()}}


class JobGraph:
    """The DAG's jobs behind each evaluation, built once each (tables share them)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.jobs: dict[str, PlanJob] = {}
        self.synthetic = bool(cfg.data.get("data", {}).get("synthetic", False))
        self._pretrained = {r.id for r in cfg.pretrain_runs}
        self._logs = cfg.results / "logs"

    def _add(self, job: PlanJob) -> str:
        self.jobs.setdefault(job.id, job)
        return job.id

    def data(self, dataset: str) -> str:
        if self.synthetic:
            disk, source = 0, "synthetic data: not counted"
        else:
            disk, unknown = job_costs.dataset_bytes(dataset)
            source = "data/catalog.yaml file sizes" + (f" ({unknown} file(s) without a published size)"
                                                       if unknown else "")
        return self._add(PlanJob(f"data {dataset}", "data", str(self.cfg.data_manifest(dataset)),
                                 str(self._logs / "data" / f"{dataset}.log"), None, 0, 0.0, CPU_JOB, disk, source))

    def pretrain(self, run: Run) -> str:
        from densessl.launch.resources import run_layout

        cost = job_costs.pretrain_cost(self.cfg, run)
        layout = run_layout(self.cfg, run)
        gpus = layout.world if layout.gpus else 0
        return self._add(PlanJob(f"pretrain {run.id}", "pretrain", str(self.cfg.final_checkpoint(run)),
                                 str(self._logs / "pretrain" / run.method / f"{run.name}.log"),
                                 str(self.cfg.pretrain_dir(run)), gpus, cost.gpu_hours, cost.source, cost.disk_bytes,
                                 cost.disk_source, (self.data(run.data),), cost.detail))

    def convert(self, run: Run) -> str:
        needs = (self.pretrain(run),) if run.id in self._pretrained else ()
        return self._add(PlanJob(f"convert {run.id}", "convert", str(self.cfg.backbone(run)),
                                 str(self._logs / "convert" / run.method / f"{run.name}.log"), None, 0, 0.0, CPU_JOB,
                                 job_costs.backbone_bytes(run.arch), "fp32 backbone.safetensors", needs))

    def evaluate(self, protocol: str, run: Run) -> str:
        cost = job_costs.evaluate_cost(self.cfg, protocol, run)
        metrics = self.cfg.eval_metrics(protocol, run)
        needs = (self.convert(run), self.data(EVALUATIONS[protocol]["dataset"]))
        return self._add(PlanJob(f"evaluate {protocol} {run.id}", "evaluate", str(metrics),
                                 str(self._logs / "eval" / protocol / run.method / f"{run.name}.log"),
                                 str(metrics.parent), self.cfg.eval_gpus(protocol), cost.gpu_hours, cost.source, 0,
                                 "not counted (metrics.json; a toolkit's work_dir)", needs))

    def closure(self, roots: Iterable[str]) -> list[str]:
        """``roots`` and every job they need, each once, in the order first met."""
        seen: dict[str, None] = {}
        stack = list(roots)[::-1]
        while stack:
            job = stack.pop()
            if job in seen:
                continue
            seen[job] = None
            stack.extend(reversed(self.jobs[job].needs))
        return list(seen)


def _group(graph: JobGraph, gid: str, title: str, roots: Iterable[str]) -> Group:
    group = Group(gid, title, graph.closure(roots))
    for job_id in group.jobs:
        job = graph.jobs[job_id]
        group.disk_bytes += job.disk_bytes
        if job.gpu_hours is None:
            group.gpu_hours_unknown_jobs += 1
        else:
            group.gpu_hours += job.gpu_hours
    return group


def _published(cells: list[CellPlan]) -> dict[str, int]:
    matched = sum(c.status == "matched" for c in cells)
    return {"total": len(cells), "matched": matched, "explained": len(cells) - matched}


def build_plan(cfg: Config) -> Plan:
    """The plan of ``cfg``: per table, per protocol and in total. Torch-free."""
    tables = load_tables()
    cells = plan(cfg, tables)
    graph = JobGraph(cfg)
    out_tables = []
    table_roots: list[str] = []
    for table in tables:
        mine = [c for c in cells if c.table == table.id]
        roots = [graph.evaluate(j.protocol, j.run) for c in mine for j in c.jobs]
        table_roots += roots
        group = _group(graph, table.id, table.title, roots)
        group.published = _published(mine)
        out_tables.append(group)
    total = _group(graph, "total", "every table (each job once)", table_roots)
    total.published = _published(cells)
    protocols, dag_roots = [], []
    for protocol in cfg.evaluations:
        roots = [graph.evaluate(protocol, run) for run in cfg.protocol_runs(protocol)]
        dag_roots += roots
        protocols.append(_group(graph, protocol, EVALUATIONS[protocol]["title"], roots))
    dag_total = _group(graph, "dag", "every job of the DAG (each once)", dag_roots)
    return Plan(cfg.preset, graph.jobs, out_tables, protocols, total, dag_total, cells)


# ------------------------------------------------------------------------------------------------- text


def _hours(g: Group) -> str:
    known = f"{g.gpu_hours:,.0f}" if g.gpu_hours >= 10 else f"{g.gpu_hours:.1f}"
    return known + (f" (+{g.gpu_hours_unknown_jobs} unknown)" if g.gpu_hours_unknown_jobs else "")


def _kinds(plan_: Plan, g: Group) -> str:
    counts = {k: 0 for k in ("data", "pretrain", "convert", "evaluate")}
    for j in g.jobs:
        counts[plan_.jobs[j].kind] += 1
    return " ".join(f"{v}{k[0]}" for k, v in counts.items())


def _rows(plan_: Plan, groups: list[Group], published: bool) -> list[list[str]]:
    rows = []
    for g in groups:
        row = [g.id, str(len(g.jobs)), _kinds(plan_, g), _hours(g), human_bytes(g.disk_bytes)]
        if published:
            p = g.published or {}
            row.insert(1, f"{p.get('matched', 0)}/{p.get('explained', 0)}/{p.get('total', 0)}")
        rows.append(row)
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def format_plan(plan_: Plan) -> str:
    """The plan as plain-text tables, the figures it uses and the jobs without one."""
    head = ["table", "matched/explained/published", "jobs", "d p c e", "GPU-hours", "disk"]
    lines = [f"plan of the {plan_.preset} preset: jobs per paper table (d data, p pretrain, c convert, e evaluate)",
             "", _table(head, _rows(plan_, plan_.tables + [plan_.total], True)),
             "", "total counts each job once: tables share jobs, so it is less than the sum of the rows.", "",
             _table(["protocol", "jobs", "d p c e", "GPU-hours", "disk"],
                    _rows(plan_, plan_.protocols + [plan_.dag_total], False)), "", "GPU-hour figures:"]
    figures: dict[str, list[str]] = {}
    unknown: dict[str, int] = {}
    for job_id in plan_.dag_total.jobs:
        job = plan_.jobs[job_id]
        if job.gpu_hours is None:
            unknown[job.source] = unknown.get(job.source, 0) + 1
        elif job.source != CPU_JOB:
            figures.setdefault(job.source, []).append(f"{job.id}: {job.gpu_hours:,.1f} GPU-h"
                                                      + (f" ({job.detail})" if job.detail else ""))
    for measurement, jobs in figures.items():
        lines.append(f"  {measurement}:")
        lines += [f"    {j}" for j in jobs]
    if not figures:
        lines.append("  (none)")
    lines.append(f"left out of the sums ({sum(unknown.values())} jobs):")
    lines += [f"  {n} × {reason}" for reason, n in sorted(unknown.items())] or ["  (none)"]
    return "\n".join(lines)

