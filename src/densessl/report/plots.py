"""The report's figures as data: what each plot shows, read from the files the stages wrote.

Each function returns :class:`Figure` records (no drawing here: ``plots_html`` renders them) and, for what
cannot be drawn, a note saying why (a run that has not run, a protocol that records no per-class values, no
published number to compare with). Nothing is estimated or filled in: a figure holds only values read from a
run's own files, and published values only from the report's cells (``paper_tables.yaml``).

Inputs:

* pretraining: ``<pretrain dir>/metrics.jsonl`` (``train/run_log.py``), one record per logged step with
  ``loss`` and, for DINO and SelfPatch (``methods/dino.py``, ``methods/selfpatch.py``), ``teacher_entropy``
  and ``patch_teacher_entropy``;
* per-class IoU: ``metrics.per_class_IoU`` of linear_ade20k (a list by class index, ``evaluate/linear_seg.py``)
  and of the mmseg protocols (a dict by class name, ``evaluate/transfer/mmseg_ade20k.py``);
* DAVIS: ``metrics.per_object`` (J-Mean, F-Mean per object ``<sequence>_<k>``, fractions), averaged per
  sequence as ``(J + F) / 2`` in percent;
* ours against published: the report's cells (``tables.json`` records) where both values exist.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from densessl.config import Config, Run
from densessl.io import read_json
from densessl.train.run_log import METRICS_NAME, read_jsonl

PER_CLASS_PROTOCOLS = ("linear_ade20k", "semfpn_ade20k", "upernet_ade20k")
DAVIS_PROTOCOL = "davis2017"
ENTROPY_KEYS = ("teacher_entropy", "patch_teacher_entropy")


@dataclass
class Series:
    """One curve or one set of points: ``x`` are numbers (steps) or category labels, ``y`` the values."""

    label: str
    x: list[Any]
    y: list[float | None]


@dataclass
class Panel:
    ylabel: str
    series: list[Series]


@dataclass
class Figure:
    """``kind``: "line" (x numeric) or "dot" (x categorical: classes, sequences, table rows)."""

    id: str          # DOM id of the rendered figure, stable across builds
    group: str       # "pretraining" | "per-class" | "davis" | "published"
    title: str
    kind: str
    xlabel: str
    panels: list[Panel]
    notes: list[str] = field(default_factory=list)


@dataclass
class Plots:
    figures: list[Figure]
    notes: dict[str, list[str]]  # group → why something is not drawn


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def pretraining_figures(cfg: Config) -> tuple[list[Figure], list[str]]:
    """One figure per pretraining run: its loss and, where the method logs it, its teacher entropy per step."""
    figures, notes = [], []
    for run in cfg.pretrain_runs:
        path = cfg.pretrain_dir(run) / METRICS_NAME
        if not path.is_file():
            notes.append(f"{run.id}: no {METRICS_NAME} (the run has not started); no curve.")
            continue
        records = [r for r in read_jsonl(path) if isinstance(r.get("step"), int)]
        if not records:
            notes.append(f"{run.id}: {METRICS_NAME} has no complete record yet; no curve.")
            continue
        panels = [Panel("loss", [_curve(records, "loss", "loss")])]
        entropy = [_curve(records, key, key.replace("_", " ")) for key in ENTROPY_KEYS
                   if any(_finite(r.get(key)) is not None for r in records)]
        if entropy:
            panels.append(Panel("entropy (nats)", entropy))
        figure = Figure(f"plot-pretrain-{slug(run.id)}", "pretraining", f"Pretraining {run.id}", "line", "step",
                        panels)
        if not entropy:
            figure.notes.append(f"{run.method} logs no teacher entropy.")
        figures.append(figure)
    return figures, notes


def _curve(records: list[dict[str, Any]], key: str, label: str) -> Series:
    points = [(r["step"], _finite(r.get(key))) for r in records]
    points = [(s, v) for s, v in points if v is not None]
    return Series(label, [s for s, _ in points], [v for _, v in points])


def _metrics(cfg: Config, protocol: str, run: Run) -> dict[str, Any] | None:
    path = cfg.eval_metrics(protocol, run)
    return read_json(path).get("metrics") if path.is_file() else None


def per_class_figures(cfg: Config) -> tuple[list[Figure], list[str]]:
    """Per-class IoU (percent) of every row of each ADE20K segmentation protocol, one figure per protocol."""
    figures, notes = [], []
    for protocol in (p for p in cfg.evaluations if p in PER_CLASS_PROTOCOLS):
        series, missing = [], []
        for run in cfg.protocol_runs(protocol):
            metrics = _metrics(cfg, protocol, run)
            values = None if metrics is None else metrics.get("per_class_IoU")
            if values is None:
                missing.append(run.id)
                continue
            if isinstance(values, dict):
                classes, ys = list(values), [_finite(v) for v in values.values()]
            else:
                classes, ys = [str(i) for i in range(len(values))], [_finite(v) for v in values]
            series.append(Series(run.id, classes, ys))
        if not series:
            notes.append(f"{protocol}: no per-class IoU recorded yet; no plot.")
            continue
        figure = Figure(f"plot-per-class-{slug(protocol)}", "per-class", f"Per-class IoU, {protocol}", "dot", "class",
                        [Panel("IoU (%)", series)])
        if missing:
            figure.notes.append("no per-class IoU recorded (not evaluated yet) for " + ", ".join(missing) + ".")
        if any(v is None for s in series for v in s.y):
            figure.notes.append("a class absent from both labels and predictions has no IoU and no point.")
        figures.append(figure)
    return figures, notes


def davis_sequences(per_object: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """(J-Mean + F-Mean) / 2 per sequence, in percent, averaged over the sequence's objects (``<seq>_<k>``)."""
    by_sequence: dict[str, list[float]] = {}
    for name, scores in per_object.items():
        sequence = name.rsplit("_", 1)[0]
        j, f = _finite(scores.get("J-Mean")), _finite(scores.get("F-Mean"))
        by_sequence.setdefault(sequence, [])
        if j is not None and f is not None:
            by_sequence[sequence].append(50.0 * (j + f))
    return {s: (sum(v) / len(v) if v else None) for s, v in by_sequence.items()}


def davis_figures(cfg: Config) -> tuple[list[Figure], list[str]]:
    if DAVIS_PROTOCOL not in cfg.evaluations:
        return [], []
    series, missing = [], []
    for run in cfg.protocol_runs(DAVIS_PROTOCOL):
        metrics = _metrics(cfg, DAVIS_PROTOCOL, run)
        if metrics is None or not metrics.get("per_object"):
            missing.append(run.id)
            continue
        per_sequence = davis_sequences(metrics["per_object"])
        series.append(Series(run.id, list(per_sequence), list(per_sequence.values())))
    if not series:
        return [], [f"{DAVIS_PROTOCOL}: no per-sequence scores recorded yet; no plot."]
    figure = Figure("plot-davis-sequences", "davis", "DAVIS 2017: J&F per sequence", "dot", "sequence",
                    [Panel("J&F (%)", series)])
    if missing:
        figure.notes.append("no per-sequence scores recorded (not evaluated yet) for " + ", ".join(missing) + ".")
    return [figure], []


def published_figures(cells: Iterable[dict[str, Any]]) -> tuple[list[Figure], list[str]]:
    """Per report table: each (row, metric) with both our value and the published one, ours beside published."""
    by_table: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        if _finite(cell.get("value")) is not None and _finite(cell.get("published")) is not None:
            by_table.setdefault(cell["table"], []).append(cell)
    if not by_table:
        return [], ["No row of ours has a published number to compare with (synthetic data is never compared, and "
                    "a row is compared only where the paper reports the same method, architecture, data and "
                    "protocol); no plot."]
    figures = []
    for table, rows in by_table.items():
        labels = [f"{c.get('row_label') or str(c.get('method')) + ', ' + str(c.get('arch'))}: "
                  f"{c.get('column') or c['metric']}" for c in rows]
        panel = Panel("value", [Series("ours", labels, [float(c["value"]) for c in rows]),
                                Series("published", labels, [float(c["published"]) for c in rows])])
        figures.append(Figure(f"plot-published-{slug(table)}", "published", f"Ours against published, {table}", "dot",
                              "", [panel]))
    return figures, []


def collect(cfg: Config, cells: Iterable[dict[str, Any]]) -> Plots:
    figures: list[Figure] = []
    notes: dict[str, list[str]] = {}
    for group, (found, why) in (("pretraining", pretraining_figures(cfg)), ("per-class", per_class_figures(cfg)),
                                ("davis", davis_figures(cfg)), ("published", published_figures(cells))):
        figures += found
        if why:
            notes[group] = why
    return Plots(figures, notes)

