"""The papers' tables (paper_tables.yaml) and which DAG job fills each of their cells.

A published row names the run that reproduces it by explicit keys (``run: {method, arch, data, epochs,
released, variant}``, in this project's identifiers), never by its display label; the table names the evaluation
protocol (``evaluation``, one protocol or one per column) and, for the detection protocols, the schedule. A row
no job of this project can reproduce carries ``unmatched: <reason>``; a row whose run the configuration does not
list (yet) may carry ``not_configured: <reason>``. Delta tables (the abstracts' claimed gains) carry ``gains``
and each row ``gain: {of: <run key>, over: <run key>}``; their cells are computed from the rows they refer to.

:func:`table_jobs` is the interface for tools that plan or track the DAG (``densessl plan`` / ``status``): per
table, every (row, column) with its Run, protocol and metrics path. It imports neither torch nor the
toolkits and takes a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from densessl.config import EVALUATIONS, Config, Run
from densessl.errors import ConfigError

TABLES_FILE = "paper_tables.yaml"
KEY_FIELDS = ("method", "arch", "data", "epochs", "released", "variant")
SYNTHETIC_REASON = "synthetic data (smoke scale) is never compared with published numbers"


@dataclass(frozen=True)
class RowKey:
    """Which of our runs reproduces a published row. ``data`` None matches any (random init: any seed);
    ``epochs`` None matches any pretraining length; ``variant`` None any architecture variant."""

    method: str
    arch: str
    data: str | None = None
    epochs: int | None = None
    released: bool = False
    variant: str | None = None

    def matches(self, run: Run, epochs: int | None) -> bool:
        """``epochs``: the run's effective pretraining epochs (None for released weights and random init)."""
        return (run.method == self.method and run.arch == self.arch and run.released == self.released
                and (self.data is None or run.data == self.data)
                and (self.variant is None or run.variant == self.variant)
                and (self.epochs is None or epochs == self.epochs))

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in KEY_FIELDS if getattr(self, k) not in (None, False)]
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Column:
    """One published column: the protocol that measures it and our metric (times ``scale``: the script-check
    table prints DAVIS J&F as a fraction, our metrics are percent)."""

    name: str
    protocol: str | None
    metric: str
    scale: float = 1.0


@dataclass(frozen=True)
class Gain:
    """A delta row's claim: ``of`` minus ``over`` in ``column`` of table ``table``."""

    of: RowKey
    over: RowKey


@dataclass(frozen=True)
class Row:
    index: int
    label: str                      # method, arch, data, epochs as the paper prints them
    values: dict[str, float | None]
    key: RowKey | None = None
    gain: Gain | None = None
    unmatched: str | None = None    # why no job of this project reproduces the row
    not_configured: str | None = None  # why the shipped presets do not list its run
    note: str | None = None


@dataclass(frozen=True)
class PaperTable:
    id: str
    title: str
    source: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    schedule: str | None = None
    gains: dict[str, tuple[str, str]] = field(default_factory=dict)  # delta column -> (table id, column)
    verified: bool = True
    notes: str | None = None

    @property
    def is_delta(self) -> bool:
        return bool(self.gains)


@dataclass(frozen=True)
class TableJob:
    """One published cell and the DAG job that fills it (one per seed replica)."""

    table: str
    row: int
    column: str
    run: Run
    protocol: str
    metric: str
    metrics_path: Path


@dataclass(frozen=True)
class CellPlan:
    """What fills one published number: its jobs (empty when none), or the reason there are none."""

    table: str
    row: int
    column: str
    published: float
    status: str                     # "matched" | "not configured" | "unmatched"
    protocol: str | None
    metric: str | None
    jobs: tuple[TableJob, ...] = ()
    reason: str | None = None
    declared: bool = False          # the reason is the table's own (unmatched / not_configured in the YAML)


# ----------------------------------------------------------------------------------------------- loading


def _where(table: str, row: int | None = None) -> str:
    return f"{TABLES_FILE}: table {table!r}" + (f", row {row}" if row is not None else "")


def _key(raw: Any, where: str) -> RowKey:
    if not isinstance(raw, dict) or not {"method", "arch"} <= set(raw):
        raise ConfigError(f"{where}: a run key is a mapping with at least method and arch, got {raw!r}")
    unknown = sorted(set(raw) - set(KEY_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: run key fields {unknown} are unknown; allowed: {', '.join(KEY_FIELDS)}")
    return RowKey(**raw)


def _label(raw: dict[str, Any]) -> str:
    parts = [str(raw.get("method")), str(raw.get("arch") or "–"), str(raw.get("pretrain_data") or "–")]
    if raw.get("epochs") is not None:
        parts.append(f"{raw['epochs']} ep")
    return ", ".join(parts)


def _columns(raw: dict[str, Any]) -> tuple[Column, ...]:
    evaluation = raw.get("evaluation")
    metrics = raw.get("metrics") or {}
    out = []
    for name in raw["columns"]:
        protocol = evaluation.get(name) if isinstance(evaluation, dict) else evaluation
        if protocol is not None and protocol not in EVALUATIONS:
            raise ConfigError(f"{_where(raw['id'])}: evaluation {protocol!r} is not a protocol; allowed: "
                              f"{', '.join(EVALUATIONS)}")
        spec = metrics.get(name, {})
        out.append(Column(name, protocol, spec.get("metric", name), float(spec.get("scale", 1.0))))
    return tuple(out)


def _row(raw: dict[str, Any], index: int, table: dict[str, Any]) -> Row:
    where = _where(table["id"], index)
    key = _key(raw["run"], where) if "run" in raw else None
    gain = None
    if "gain" in raw:
        g = raw["gain"]
        if not isinstance(g, dict) or set(g) != {"of", "over"}:
            raise ConfigError(f"{where}: gain needs exactly 'of' and 'over' (run keys), got {g!r}")
        gain = Gain(_key(g["of"], where + " gain.of"), _key(g["over"], where + " gain.over"))
    unmatched = raw.get("unmatched") or table.get("unmatched")
    if sum(x is not None for x in (key, gain, unmatched)) != 1:
        raise ConfigError(f"{where} ({_label(raw)}): give exactly one of 'run' (the run key that reproduces it), "
                          f"'gain' (delta tables) or 'unmatched' (the reason no job reproduces it)")
    if gain is not None and not table.get("gains"):
        raise ConfigError(f"{where}: a 'gain' row needs the table's 'gains' (delta column -> table and column)")
    return Row(index, _label(raw), dict(raw["values"]), key, gain, unmatched, raw.get("not_configured"),
               raw.get("note"))


def parse_tables(raw_tables: list[dict[str, Any]]) -> list[PaperTable]:
    tables = []
    for raw in raw_tables:
        gains = {col: (spec["table"], spec.get("column", col.removeprefix("delta_")))
                 for col, spec in (raw.get("gains") or {}).items()}
        columns = _columns(raw)
        rows = tuple(_row(r, i, raw) for i, r in enumerate(raw["rows"]))
        for row in rows:
            if set(row.values) != set(raw["columns"]):
                raise ConfigError(f"{_where(raw['id'], row.index)}: values {sorted(row.values)} differ from the "
                                  f"table's columns {raw['columns']}")
        tables.append(PaperTable(raw["id"], raw["title"], raw["source"], columns, rows, raw.get("schedule"),
                                 gains, bool(raw.get("verified", True)), raw.get("notes")))
    ids = {t.id for t in tables}
    for t in tables:
        for col, (ref, _) in t.gains.items():
            if ref not in ids:
                raise ConfigError(f"{_where(t.id)}: gains.{col} refers to table {ref!r}, which does not exist")
    return tables


@cache
def load_tables() -> tuple[PaperTable, ...]:
    """The published tables of paper_tables.yaml, with their mapping keys checked."""
    text = resources.files("densessl.report").joinpath(TABLES_FILE).read_text(encoding="utf-8")
    return tuple(parse_tables(yaml.safe_load(text)))


def published_count(tables: tuple[PaperTable, ...] | list[PaperTable]) -> int:
    """How many numbers the tables publish (null entries are not numbers)."""
    return sum(v is not None for t in tables for r in t.rows for v in r.values.values())


# ---------------------------------------------------------------------------------------------- matching


def run_epochs(cfg: Config, run: Run) -> int | None:
    """Pretraining epochs of one of our runs: a release's stated epochs (None where unstated), None for random
    init."""
    if run.released:
        return run.epochs
    if run.is_random_init:
        return None
    epochs = cfg.pretrain_settings(run)["train"].get("epochs")
    return int(epochs) if epochs is not None else None


class Matcher:
    """Our runs per protocol, computed once per configuration."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.synthetic = bool(cfg.data.get("data", {}).get("synthetic", False))
        self._runs: dict[str, list[tuple[Run, int | None]]] = {}
        self._all = [(r, run_epochs(cfg, r)) for r in cfg.pretrain_runs + cfg.released_runs] + [
            (r, None) for r in cfg.baseline_runs]

    def protocol_runs(self, protocol: str) -> list[tuple[Run, int | None]]:
        if protocol not in self._runs:
            self._runs[protocol] = [(r, run_epochs(self.cfg, r)) for r in self.cfg.protocol_runs(protocol)]
        return self._runs[protocol]

    def runs(self, key: RowKey, protocol: str) -> list[Run]:
        return [r for r, ep in self.protocol_runs(protocol) if key.matches(r, ep)]

    def why_not(self, table: PaperTable, key: RowKey, protocol: str | None, row: Row) -> str:
        """Why ``key`` has no job on ``protocol`` in this configuration (the row's own reason appended)."""
        if self.synthetic:
            return SYNTHETIC_REASON
        extra = f" ({row.not_configured})" if row.not_configured else ""
        if protocol is None:
            return f"the table names no evaluation protocol{extra}"
        if protocol not in self.cfg.evaluations:
            return f"protocol {protocol} is not in this configuration's evaluations{extra}"
        schedule = self.schedule_mismatch(table, protocol)
        if schedule:
            return schedule + extra
        if not any(key.matches(r, ep) for r, ep in self._all):
            return f"no run {key.describe()} in this configuration{extra}"
        return f"protocol {protocol} does not evaluate run {key.describe()} here (baselines.protocols){extra}"

    def schedule_mismatch(self, table: PaperTable, protocol: str) -> str | None:
        if table.schedule is None:
            return None
        ours = self.cfg.eval_settings(protocol).get("schedule", "1x")
        if ours != table.schedule:
            return f"the table's schedule is {table.schedule}, evaluate.{protocol}.schedule is {ours}"
        return None

    def jobs(self, table: PaperTable, row: Row, column: Column, key: RowKey) -> list[TableJob]:
        if self.synthetic or column.protocol is None or column.protocol not in self.cfg.evaluations:
            return []
        if self.schedule_mismatch(table, column.protocol):
            return []
        return [TableJob(table.id, row.index, column.name, run, column.protocol, column.metric,
                         self.cfg.eval_metrics(column.protocol, run))
                for run in self.runs(key, column.protocol)]


def _gain_column(tables: dict[str, PaperTable], table: PaperTable, column: str) -> tuple[PaperTable, Column]:
    ref, ref_column = table.gains[column]
    target = tables[ref]
    for c in target.columns:
        if c.name == ref_column:
            return target, c
    raise ConfigError(f"{_where(table.id)}: gains.{column} refers to column {ref_column!r} of {ref!r}, which it "
                      f"does not have")


def _row_of(table: PaperTable, key: RowKey) -> Row:
    for row in table.rows:
        if row.key == key:
            return row
    raise ConfigError(f"{_where(table.id)}: no row has the run key {key.describe()} (a gain refers to it)")


def plan(cfg: Config, tables: tuple[PaperTable, ...] | None = None) -> list[CellPlan]:
    """Every published number and what fills it in ``cfg``: its jobs, or why there are none."""
    tables = load_tables() if tables is None else tables
    by_id = {t.id: t for t in tables}
    matcher = Matcher(cfg)
    out = []
    for table in tables:
        for row in table.rows:
            for column in table.columns:
                published = row.values[column.name]
                if published is None:
                    continue
                if row.unmatched is not None:
                    out.append(CellPlan(table.id, row.index, column.name, published, "unmatched", column.protocol,
                                        column.metric, reason=row.unmatched, declared=True))
                    continue
                if row.gain is not None:
                    ref_table, ref_column = _gain_column(by_id, table, column.name)
                    jobs, reasons = [], []
                    for key in (row.gain.of, row.gain.over):
                        ref_row = _row_of(ref_table, key)
                        found = matcher.jobs(ref_table, ref_row, ref_column, key)
                        jobs += found
                        if not found:
                            reasons.append(f"{key.describe()}: "
                                           + matcher.why_not(ref_table, key, ref_column.protocol, ref_row))
                    status = "not configured" if reasons else "matched"
                    declared = all(_row_of(ref_table, k).not_configured for k in (row.gain.of, row.gain.over)
                                   if not matcher.jobs(ref_table, _row_of(ref_table, k), ref_column, k))
                    out.append(CellPlan(table.id, row.index, column.name, published, status, ref_column.protocol,
                                        ref_column.metric, tuple(jobs), "; ".join(reasons) or None, declared))
                    continue
                assert row.key is not None
                jobs = matcher.jobs(table, row, column, row.key)
                if jobs:
                    out.append(CellPlan(table.id, row.index, column.name, published, "matched", column.protocol,
                                        column.metric, tuple(jobs)))
                else:
                    out.append(CellPlan(table.id, row.index, column.name, published, "not configured",
                                        column.protocol, column.metric,
                                        reason=matcher.why_not(table, row.key, column.protocol, row),
                                        declared=row.not_configured is not None))
    return out


def table_jobs(cfg: Config) -> dict[str, list[TableJob]]:
    """Per paper table, the DAG jobs that fill its cells: (row, column, Run, protocol, metrics path), one per
    seed replica. A delta table's jobs are those of the rows it refers to. Torch-free and fast."""
    out: dict[str, list[TableJob]] = {t.id: [] for t in load_tables()}
    for cell in plan(cfg):
        out[cell.table].extend(cell.jobs)
    return out


def accounting(cells: list[CellPlan]) -> dict[str, int]:
    """How many published numbers are matched to a DAG job, explained (unmatched, with its reason) or not
    configured here (with the reason); the three add up to the published count."""
    counts = {"published": len(cells), "matched": 0, "unmatched": 0, "not configured": 0}
    for c in cells:
        counts[c.status] += 1
    return counts


def published_entry(protocol: str, run: Run, metric: str, synthetic: bool, epochs: int | None = None,
                    tables: tuple[PaperTable, ...] | None = None) -> tuple[float, PaperTable] | None:
    """(published ``metric``, its table) of the row whose run key is ``run``'s (epochs: the run's effective
    epochs) on ``protocol``: the per-protocol sections' "published" column. None for synthetic data."""
    if synthetic:
        return None
    for table in load_tables() if tables is None else tables:
        for column in table.columns:
            if column.protocol != protocol or column.metric != metric or column.scale != 1.0:
                continue
            for row in table.rows:
                value = row.values[column.name]
                if row.key is not None and row.key.matches(run, epochs) and value is not None:
                    return value, table
    return None


def published_value(protocol: str, run: Run, metric: str, synthetic: bool, epochs: int | None = None,
                    tables: tuple[PaperTable, ...] | None = None) -> float | None:
    """The number of :func:`published_entry`, or None."""
    entry = published_entry(protocol, run, metric, synthetic, epochs, tables)
    return None if entry is None else entry[0]
