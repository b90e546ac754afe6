"""The report's cell: one value of ours next to one published number, with where both come from.

Every cell of ``tables.json`` has the fields of :class:`Cell` (docs/report.md documents them). A cell holds a
value only when a run of this workflow wrote it into a metrics.json; a published number no job fills says why
(``status`` and ``reason``), and a run that has not run yet says "not run". Seed replicas of one published row
are separate cells (their ``seed`` differs); :func:`row_stats` aggregates them into mean ± standard deviation,
and :func:`gains` tests each claimed gain between two rows against that seed noise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from densessl.config import Config, Run
from densessl.io import read_json
from densessl.report.paper_tables import CellPlan, PaperTable, TableJob

SCHEMA = "densessl.tables/1"
STATUSES = ("ok", "not run", "no value", "not configured", "unmatched")
ALPHA = 0.05  # one-sided significance level of the gain test


@dataclass
class Cell:
    table: str                      # paper table id (paper cells) or protocol name (per-protocol cells)
    protocol: str | None            # the evaluation protocol that measures it
    run: str | None                 # run id; None where no job fills the number
    role: str | None                # pretrained | random-init | supervised-reference | released
    network: str | None             # architecture and variant, e.g. vit-s16.selfpatch
    seed: int | None                # random-init seed or train seed; None for released weights
    metric: str | None              # our metric name
    value: float | None             # ours, in the table's unit
    published: float | None         # the paper's number (None: not published, or synthetic data)
    source: str | None              # where the published number is printed
    status: str = "ok"              # one of STATUSES
    delta: float | None = None      # value - published
    reason: str | None = None       # why no value (not configured / unmatched)
    row: int | None = None          # index of the published row in its table
    row_label: str | None = None    # the row as the paper prints it
    column: str | None = None       # the table's column name
    method: str | None = None       # display labels of the run (per-protocol cells)
    arch: str | None = None
    pretrain_data: str | None = None
    provenance: dict[str, Any] | None = None  # run, checkpoint_sha256, data_fingerprint, commit, config_hash

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def network(cfg: Config, run: Run) -> str:
    variant = cfg.variant_of(run)
    return f"{run.arch}.{variant}" if variant else run.arch


def seed_of(cfg: Config, run: Run) -> int | None:
    """Random init: its seed; a trained run: its train seed (TrainConfig's default 0 where unset)."""
    if run.is_random_init:
        return run.seed
    if run.released:
        return None
    return int(cfg.pretrain_settings(run)["train"].get("seed", 0))


def release_checksum(cfg: Config, run: Run) -> str | None:
    """How a released run's file was checked (checkpoints/released.py): pinned in the configuration, or
    recorded on first download in the lock file; None for the other runs."""
    if not run.released:
        return None
    sha = str(cfg.released_spec(run).get("sha256") or "").lower()
    if sha == "record":
        return f"checksum recorded on first download ({cfg.released_lock.name})"
    return "checksum pinned in the configuration" if sha else "checksum not verified (no sha256 in the configuration)"


def cell_provenance(run: Run, result: dict[str, Any], path: str, cfg: Config | None = None) -> dict[str, Any]:
    prov = result.get("provenance") or {}
    inputs = prov.get("inputs") or {}
    data = inputs.get("data") or {}
    out = {"run": run.id, "metrics": path, "checkpoint_sha256": inputs.get("backbone_sha256"),
           "data_fingerprint": data.get("content_sha256") or data.get("listing_sha256"),
           "commit": (prov.get("git") or {}).get("commit"), "dirty": (prov.get("git") or {}).get("dirty"),
           "config_hash": prov.get("config_hash")}
    if cfg is not None and run.released:
        out["release_checksum"] = release_checksum(cfg, run)
    return out


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class MetricsCache:
    """metrics.json files read once each (several tables read the same job)."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, Any] | None] = {}

    def get(self, job: TableJob) -> dict[str, Any] | None:
        key = str(job.metrics_path)
        if key not in self._files:
            self._files[key] = read_json(job.metrics_path) if job.metrics_path.is_file() else None
        return self._files[key]


def job_cell(cfg: Config, table: PaperTable, plan: CellPlan, job: TableJob, cache: MetricsCache,
             scale: float) -> Cell:
    row = table.rows[plan.row]
    base = dict(table=table.id, protocol=job.protocol, run=job.run.id, role=job.run.role,
                network=network(cfg, job.run), seed=seed_of(cfg, job.run), metric=job.metric,
                published=plan.published, source=table.source, row=plan.row, row_label=row.label,
                column=plan.column)
    result = cache.get(job)
    if result is None:
        return Cell(value=None, status="not run", **base)
    value = _number(result.get("metrics", {}).get(job.metric))
    prov = cell_provenance(job.run, result, str(job.metrics_path), cfg)
    if value is None:
        return Cell(value=None, status="no value", provenance=prov,
                    reason=f"{job.metrics_path} has no {job.metric}", **base)
    value *= scale
    return Cell(value=value, delta=value - plan.published, provenance=prov, **base)


def paper_cells(cfg: Config, tables: tuple[PaperTable, ...], plans: list[CellPlan],
                cache: MetricsCache | None = None) -> list[Cell]:
    """One cell per (published number, job); one reasoned empty cell per number without a job. Delta-table
    numbers are left to :func:`gains` (they compare two rows, not one run)."""
    by_id = {t.id: t for t in tables}
    cache = cache or MetricsCache()
    out = []
    for plan in plans:
        table = by_id[plan.table]
        if table.is_delta:
            continue
        row = table.rows[plan.row]
        scale = next(c.scale for c in table.columns if c.name == plan.column)
        if plan.jobs:
            out += [job_cell(cfg, table, plan, job, cache, scale) for job in plan.jobs]
            continue
        key = row.key
        role = None
        if key is not None:
            role = Run(key.method, key.arch, key.data or "seed0", released=key.released).role
        out.append(Cell(table=table.id, protocol=plan.protocol, run=None, role=role, network=None, seed=None,
                        metric=plan.metric, value=None, published=plan.published, source=table.source,
                        status=plan.status, reason=plan.reason, row=plan.row, row_label=row.label,
                        column=plan.column))
    return out


# ------------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class RowStat:
    """Our value of one published (row, column) over its seed replicas."""

    values: tuple[float, ...]
    runs: tuple[str, ...]
    status: str                     # ok | not run | no value | not configured | unmatched

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


def row_stats(cells: list[Cell]) -> dict[tuple[str, int, str], RowStat]:
    """(table, row, column) -> the seed replicas' values. Status "ok" when every replica has its value; else the
    first missing replica's status (a half-finished set of seeds is not averaged)."""
    grouped: dict[tuple[str, int, str], list[Cell]] = {}
    for c in cells:
        if c.row is not None and c.column is not None:
            grouped.setdefault((c.table, c.row, c.column), []).append(c)
    out = {}
    for key, group in grouped.items():
        missing = [c for c in group if c.status != "ok"]
        if missing:
            out[key] = RowStat((), tuple(c.run for c in group if c.run), missing[0].status)
        else:
            out[key] = RowStat(tuple(c.value for c in group if c.value is not None),
                               tuple(c.run for c in group if c.run), "ok")
    return out


# ------------------------------------------------------------------------------------------------- gains


@dataclass
class GainResult:
    """One claimed gain (a delta-table cell): ours next to the paper's, and whether seed noise explains ours."""

    table: str
    row: int
    row_label: str
    column: str
    metric: str | None
    protocol: str | None
    of: list[str]                   # run ids of the row that should be better
    over: list[str]                 # run ids of the row it is compared with
    published: float
    value: float | None             # mean(of) - mean(over)
    standard_error: float | None    # Welch: sqrt(sd_of^2/n_of + sd_over^2/n_over)
    test: str | None
    p_value: float | None
    verdict: str
    status: str
    reason: str | None
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def welch_one_sided(a: tuple[float, ...], b: tuple[float, ...], positive: bool) -> float | None:
    """p-value of Welch's t-test that mean(a) - mean(b) is > 0 (``positive``) or < 0; None when undefined."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    result = stats.ttest_ind(a, b, equal_var=False, alternative="greater" if positive else "less")
    p = float(result.pvalue)
    return None if math.isnan(p) else p


def gain_verdict(of: RowStat, over: RowStat, published: float) -> tuple[str, float | None, float | None, str | None]:
    """(verdict, standard error, p-value, test) of our gain against the seed noise of both rows."""
    if of.n < 2 or over.n < 2:
        return ("one seed per row: seed noise unknown (list seeds under runs[].seeds)", None, None, None)
    se = math.sqrt(of.sd ** 2 / of.n + over.sd ** 2 / over.n)  # type: ignore[operator]
    test = f"Welch's t-test, one-sided (the published sign), {of.n} vs {over.n} seeds, alpha {ALPHA}"
    positive = published >= 0
    p = welch_one_sided(of.values, over.values, positive)
    if p is None:
        return ("no seed variance: the test is undefined", se, None, test)
    if p < ALPHA:
        return ("reproduced beyond seed noise", se, p, test)
    reverse = welch_one_sided(of.values, over.values, not positive)
    if reverse is not None and reverse < ALPHA:
        return ("reversed beyond seed noise", se, p, test)
    return ("not beyond seed noise", se, p, test)


def gains(tables: tuple[PaperTable, ...], plans: list[CellPlan], stats: dict[tuple[str, int, str], RowStat]
          ) -> list[GainResult]:
    """Each delta-table number, computed from the two rows it refers to."""
    by_id = {t.id: t for t in tables}
    out = []
    for plan in plans:
        table = by_id[plan.table]
        if not table.is_delta:
            continue
        row = table.rows[plan.row]
        base = dict(table=table.id, row=plan.row, row_label=row.label, column=plan.column, metric=plan.metric,
                    protocol=plan.protocol, published=plan.published, source=table.source)
        if plan.status != "matched" or row.gain is None:
            out.append(GainResult(of=[], over=[], value=None, standard_error=None, test=None, p_value=None,
                                  verdict=plan.status, status=plan.status, reason=plan.reason, **base))
            continue
        ref_id, ref_column = table.gains[plan.column]
        ref = by_id[ref_id]
        sides = []
        for key in (row.gain.of, row.gain.over):
            ref_row = next(r for r in ref.rows if r.key == key)
            sides.append(stats.get((ref_id, ref_row.index, ref_column), RowStat((), (), "not run")))
        of, over = sides
        if of.status != "ok" or over.status != "ok":
            status = of.status if of.status != "ok" else over.status
            out.append(GainResult(of=list(of.runs), over=list(over.runs), value=None, standard_error=None,
                                  test=None, p_value=None, verdict=status, status=status, reason=None, **base))
            continue
        verdict, se, p, test = gain_verdict(of, over, plan.published)
        out.append(GainResult(of=list(of.runs), over=list(over.runs), value=of.mean - over.mean,  # type: ignore[operator]
                              standard_error=se, test=test, p_value=p, verdict=verdict, status="ok", reason=None,
                              **base))
    return out

