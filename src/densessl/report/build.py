"""Rebuild the report from the metrics files: the papers' tables cell by cell, then one section per protocol.

Every value in the report is read from a metrics.json that a run of this workflow wrote; published numbers
come only from paper_tables.yaml (each table citing its paper, README or project page) and are shown only
where the row's explicit run key and the protocol are the ones the paper reports (report/paper_tables.py),
and never for synthetic data. docs/report.md describes the cells of tables.json.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

from densessl import provenance
from densessl.config import DATA_DISPLAY, EVALUATIONS, METHOD_DISPLAY, Config, Run
from densessl.io import read_json, write_json, write_text
from densessl.models.arch_names import ARCH_DISPLAY
from densessl.models.variants import VARIANT_DISPLAY
from densessl.protocol_names import protocol_base
from densessl.report import cells as cellmod
from densessl.report import paper_tables, plots_html, render_tables
from densessl.report import reference_check as refcheck
from densessl.report.code_versions import summarise as summarise_code_versions
from densessl.report.paper_tables import published_entry, published_value, run_epochs
from densessl.report.uncertainty import paired_standard_error

# Metrics shown per protocol (headline first), with the unit they are reported in.
REPORTED_METRICS: dict[str, list[str]] = {
    "patchseg_coco": ["macro_recall", "macro_f1_nanmean", "macro_precision_nanmean", "macro_f1", "macro_precision",
                      "accuracy"],
    "patchseg_ade20k": ["macro_recall", "macro_f1_nanmean", "macro_precision_nanmean", "macro_f1", "macro_precision",
                        "accuracy"],
    "linear_ade20k": ["mIoU", "mAcc", "aAcc"],
    "davis2017": ["JF_mean", "J_mean", "F_mean"],
    "inat19_finetune": ["top1", "top5"],
    "knn_imagenet": ["knn_top1", "knn_top5"],
    "linear_imagenet": ["linear_top1", "final_top1"],
    "keypointrcnn_r50_fpn_coco": ["AP_kp", "AP_kp50", "AP_kp75"],
    "semfpn_ade20k": ["mIoU", "mAcc", "aAcc"],
    "upernet_ade20k": ["mIoU", "mAcc", "aAcc"],
    # mmdet protocols (evaluate/transfer/mmdet_run.py): the papers' column names, percent
    "maskrcnn_vit_fpn_coco": ["AP_bb", "AP_bb50", "AP_bb75", "AP_mk", "AP_mk50", "AP_mk75"],
    "maskrcnn_r50_c4_coco": ["AP_bb", "AP_bb50", "AP_bb75", "AP_mk", "AP_mk50", "AP_mk75"],
    "maskrcnn_r50_fpn_coco": ["AP_bb", "AP_bb50", "AP_bb75", "AP_mk", "AP_mk50", "AP_mk75"],
    "maskrcnn_r50_fpn_lvis": ["AP_bb", "AP_bb50", "AP_bb75", "AP_mk", "AP_mk50", "AP_mk75", "APr", "APc", "APf"],
    "maskrcnn_r50_fpn_cityscapes": ["AP", "AP50", "AP_bb", "AP_mk"],
    "fasterrcnn_r50_c4_voc": ["AP", "AP50", "AP75"],
}
REPORTED_METRICS["patchseg_coco_things"] = REPORTED_METRICS["patchseg_coco"]
# What a reader needs to read a protocol's columns (iancovert/patch-seg patchseg/loss.py takes plain means,
# which are NaN when a valid class is never predicted: report both means).
PATCHSEG_NOTE = ("macro_f1 and macro_precision are the official benchmark's plain means over valid classes: a valid "
                 "class the head never predicts has precision 0/0, which makes both NaN (shown as –). The _nanmean "
                 "columns leave such classes out. macro_recall, the headline, has no such case.")
PROTOCOL_NOTES: dict[str, str] = {"patchseg_coco": PATCHSEG_NOTE, "patchseg_ade20k": PATCHSEG_NOTE,
                                  "patchseg_coco_things": PATCHSEG_NOTE}
NOT_APPLICABLE = "n/a"  # a protocol that cannot evaluate this backbone family (Config.applies)
# Diagnostics shown after the metrics, without margins: not scores (evaluate/feature_stats.py says why).
DIAGNOSTICS: dict[str, list[str]] = {
    "patchseg_coco": ["feature_effective_rank"],
    "patchseg_ade20k": ["feature_effective_rank"],
    "patchseg_coco_things": ["feature_effective_rank"],
}


def display(run: Run) -> tuple[str, str, str]:
    method = METHOD_DISPLAY.get(run.method, run.method)
    data = "none" if run.is_random_init else DATA_DISPLAY.get(run.data, run.data)
    if run.is_random_init:
        method = f"{method} ({run.data})"
    if run.epochs is not None:  # a run named by its epochs (Run.name): one of a recipe's epoch variants
        method = f"{method} ({run.epochs} ep)"
    if run.train_seed is not None:  # one seed replica of a run
        method = f"{method} (seed {run.train_seed})"
    if run.released:
        method = f"{method} (released weights)"
    arch = ARCH_DISPLAY.get(run.arch, run.arch)
    if run.variant:
        arch = f"{arch}, {VARIANT_DISPLAY[run.variant]}"
    return method, arch, data


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def build_report(cfg: Config) -> Path:
    started = time.time()
    synthetic = bool(cfg.data.get("data", {}).get("synthetic", False))
    cells: list[cellmod.Cell] = []  # the per-protocol sections' cells
    sections_md: list[str] = []
    sections_html: list[str] = []
    stage_times: list[tuple[str, float | None]] = []
    artifacts: list[tuple[str, dict[str, Any] | None]] = []  # (label, provenance) of every result shown
    summary_columns: list[str] = []
    summary_cells: dict[str, dict[str, str]] = {}
    checks = []
    for protocol in cfg.evaluations:
        base = protocol_base(protocol)  # a Patch-Seg grid point reports as its base protocol
        metrics = REPORTED_METRICS[base]
        shown = metrics + DIAGNOSTICS.get(base, [])
        rows: list[tuple[Run, dict[str, Any]]] = []
        not_run: set[str] = set()
        for run in cfg.protocol_runs(protocol):  # a row the protocol does not apply to: "n/a" in the summary
            path = cfg.eval_metrics(protocol, run)
            if not path.is_file():  # a report built before every job has run: the row says "not run"
                not_run.add(run.id)
                rows.append((run, {}))
                continue
            result = read_json(path)
            rows.append((run, result["metrics"]))
            stage_times.append((f"evaluate {protocol} {run.id}", result["provenance"].get("wall_s")))
            artifacts.append((f"evaluate {protocol} {run.id}", result["provenance"]))
            prov_cell = cellmod.cell_provenance(run, result, str(path), cfg)
            method, arch, data = display(run)
            for metric in shown:
                entry = published_entry(protocol, run, metric, synthetic, run_epochs(cfg, run))
                cells.append(cellmod.Cell(
                    table=protocol, protocol=protocol, run=run.id, role=run.role, network=cellmod.network(cfg, run),
                    seed=cellmod.seed_of(cfg, run), metric=metric, value=_metric(result["metrics"], metric),
                    published=entry[0] if entry else None, source=entry[1].source if entry else None,
                    method=method, arch=arch, pretrain_data=data, provenance=prov_cell))
        header = ["method", "arch", "pretrain data", *shown, "published"]
        body = []
        for run, values in rows:
            method, arch, data = display(run)
            pub = published_value(protocol, run, metrics[0], synthetic, run_epochs(cfg, run))
            shown_values = (["not run"] * len(shown) if run.id in not_run
                            else [_fmt(_metric(values, m)) for m in shown])
            body.append([method, arch, data, *shown_values, _fmt(pub)])
        margins = baseline_margins(cfg, rows, metrics, protocol)
        checks += refcheck.reference_checks(cfg, protocol, rows, metrics[0])
        summary_columns.append(f"{protocol} {metrics[0]}")
        for run, values in rows:
            if not run.is_random_init:
                summary_cells.setdefault(run.id, {})[protocol] = _summary_cell(cfg, rows, run, values, metrics[0],
                                                                               protocol)
        title = f"{EVALUATIONS[protocol]['title']} (`{protocol}`)"
        note = PROTOCOL_NOTES.get(base)
        sections_md.append(_md_section(title, header, body, margins, metrics, note))
        sections_html.append(_html_section(title, header, body, margins, metrics, note))

    summary_body = [[*_row_label(cfg, cfg.run(run_id)),
                     *[cells_of.get(p, "–" if cfg.applies(p, cfg.run(run_id)) else NOT_APPLICABLE)
                       for p in cfg.evaluations]]
                    for run_id, cells_of in summary_cells.items()]
    if checks:
        labels = {r.id: _row_label(cfg, r) for r in cfg.supervised_runs}
        check_body = refcheck.check_rows(checks, labels)
        sections_md.insert(0, f"## {refcheck.TITLE}\n\n{CHECK_NOTE}\n\n"
                           + _md_table(refcheck.CHECK_HEADER, check_body) + "\n")
        sections_html.insert(0, f"<h2>{html.escape(refcheck.TITLE)}</h2><p>{html.escape(CHECK_NOTE)}</p>"
                             + _html_table(refcheck.CHECK_HEADER, check_body))
    summary_header = ["method", "arch", *summary_columns]
    sections_md.insert(0, "## Summary: headline metric (margin over the best random-init seed)\n\n"
                       + _md_table(summary_header, summary_body) + "\n")
    sections_html.insert(0, "<h2>Summary: headline metric (margin over the best random-init seed)</h2>"
                         + _html_table(summary_header, summary_body))

    for run in cfg.pretrain_runs:
        summary = cfg.pretrain_dir(run) / "train_summary.json"
        if summary.is_file():
            train_prov = read_json(summary)["provenance"]
            stage_times.append((f"pretrain {run.id}", train_prov.get("wall_s")))
            artifacts.append((f"pretrain {run.id}", train_prov))
    for run in cfg.all_runs:
        sidecar = cfg.backbone(run).with_suffix(".json")
        if sidecar.is_file():
            artifacts.append((f"convert {run.id}", read_json(sidecar).get("provenance")))
    data_hashes = {}
    for dataset in cfg.datasets:
        manifest = read_json(cfg.data_manifest(dataset))
        fp = manifest["fingerprint"]
        data_hashes[dataset] = fp["content_sha256"] or fp["listing_sha256"]
        stage_times.append((f"data {dataset}", manifest["provenance"].get("wall_s")))

    tables = paper_tables.load_tables()
    plans = paper_tables.plan(cfg, tables)
    paper_cells = cellmod.paper_cells(cfg, tables, plans)
    stats = cellmod.row_stats(paper_cells)
    gain_results = cellmod.gains(tables, plans, stats)
    # at paper scale the papers' tables come first; at smoke scale (synthetic data) only their counts, last
    at = len(sections_md) if synthetic else 0
    sections_md.insert(at, render_tables.markdown(tables, plans, paper_cells, stats, gain_results, synthetic))
    sections_html.insert(at, render_tables.html_section(tables, plans, paper_cells, stats, gain_results, synthetic))

    prov = provenance.collect("report", cfg.hash, {"data": data_hashes}, started)
    versions, version_warnings = summarise_code_versions(artifacts)
    prov["code_versions"], prov["code_version_warnings"] = versions, version_warnings
    out = cfg.report_dir
    write_json(out / "tables.json", {
        "schema": cellmod.SCHEMA, "accounting": paper_tables.accounting(plans),
        "cells": [c.as_dict() for c in paper_cells], "gains": [g.as_dict() for g in gain_results],
        "results": [c.as_dict() for c in cells]})
    write_json(out / refcheck.CHECKS_NAME, refcheck.checks_json(checks))
    md = _markdown(cfg, sections_md, prov, stage_times, synthetic)
    write_text(out / "report.md", md)
    sections_html.append(plots_html.html_section(cfg, [c.as_dict() for c in paper_cells]))  # the papers' tables
    write_text(out / "index.html", _html(cfg, sections_html, prov, stage_times, synthetic))
    return out / "report.md"


def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(name)
    return None if value is None else float(value)


def _baselines(cfg: Config, rows: list[tuple[Run, dict[str, Any]]], run: Run) -> list[dict[str, Any]]:
    """Metrics of the random-init rows of ``run``'s own network (same architecture and variant)."""
    variant = cfg.variant_of(run)
    return [v for r, v in rows if r.is_random_init and r.arch == run.arch and r.variant == variant]


def _row_label(cfg: Config, run: Run) -> list[str]:
    """(method, arch) as the margin tables show them: the arch names the variant the baseline was drawn as."""
    variant = cfg.variant_of(run)
    arch = ARCH_DISPLAY.get(run.arch, run.arch)
    return [display(run)[0], f"{arch}, {VARIANT_DISPLAY[variant]}" if variant else arch]


def _best_row(baselines: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    scored = [b for b in baselines if (x := _metric(b, metric)) is not None and not math.isnan(x)]
    return max(scored, key=lambda b: _metric(b, metric), default=None)


def _margin_text(protocol: str, values: dict[str, Any], best_row: dict[str, Any], metric: str) -> tuple[str, bool]:
    """('+0.30', False) or, where the protocol's metric is a mean over items, ('+0.30 ± 0.44', within), with
    ``within`` true when the margin is under two paired standard errors."""
    margin = _metric(values, metric) - _metric(best_row, metric)
    se = paired_standard_error(protocol, values, best_row, metric)
    if se is None:
        return f"{margin:+.2f}", False
    return f"{margin:+.2f} ± {se[0]:.2f}", abs(margin) < 2 * se[0]


def _summary_cell(cfg: Config, rows: list[tuple[Run, dict[str, Any]]], run: Run, values: dict[str, Any],
                  metric: str, protocol: str = "") -> str:
    """'0.24 (+0.02)': the value and its margin; a reader sees at a glance which rows beat their baseline."""
    ours, best_row = _metric(values, metric), _best_row(_baselines(cfg, rows, run), metric)
    if ours is None or math.isnan(ours):
        return "–"
    return f"{ours:.2f}" if best_row is None else f"{ours:.2f} ({_margin_text(protocol, values, best_row, metric)[0]})"


def baseline_margins(cfg: Config, rows: list[tuple[Run, dict[str, Any]]], metrics: list[str], protocol: str = ""
                     ) -> list[list[str]]:
    """For each compared row (pretrained, released, supervised reference): value − best random-init seed of the same
    architecture and variant, per metric (± the paired standard error where the metric is a mean over items,
    report/uncertainty.py), as measured: whether a method must beat it is not this table's question."""
    out = []
    for run, values in rows:
        if run.is_random_init:
            continue
        baselines = _baselines(cfg, rows, run)
        if not baselines:
            continue
        line = _row_label(cfg, run)
        for m in metrics:
            ours = _metric(values, m)
            best_row = _best_row(baselines, m)
            if ours is None or best_row is None or math.isnan(ours):
                line.append("–")
            else:
                best = _metric(best_row, m)
                text, within = _margin_text(protocol, values, best_row, m)
                noise = "; within 2 standard errors" if within else ""
                line.append(f"{text} (best of {len(baselines)} seeds {best:.2f}{noise})")
        out.append(line)
    return out


CHECK_NOTE = ("The supervised reference is the compared network trained with labels; beating the best random-init "
              "seed of the same network shows that the protocol can tell learned features from random ones. The "
              "methods' margins below are what their training achieved in this budget, reported as measured.")
MARGIN_NOTE = "Margin over the best random-init seed of the same network (as measured; not a pass mark):"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


ERROR_BAR_NOTE = ("± is the paired standard error of the margin over the objects both rows were scored on (the "
                  "metric is their mean); a margin within about two of them is not a difference.")


def _has_error_bars(margins: list[list[str]]) -> bool:
    return any("±" in cell for row in margins for cell in row)


def _md_section(title: str, header: list[str], body: list[list[str]], margins: list[list[str]],
                metrics: list[str], note: str | None = None) -> str:
    text = f"## {title}\n\n{_md_table(header, body)}\n"
    if note:
        text += f"\n{note}\n"
    if margins:
        text += f"\n{MARGIN_NOTE}\n\n" + _md_table(["method", "arch", *metrics], margins) + "\n"
        if _has_error_bars(margins):
            text += f"\n{ERROR_BAR_NOTE}\n"
    return text


def _markdown(cfg: Config, sections: list[str], prov: dict[str, Any], stage_times: list[tuple[str, Any]],
              synthetic: bool) -> str:
    note = ("Synthetic data (smoke scale): these numbers test the pipeline and the learning signal; they are not "
            "comparable with published numbers, so the `published` column is empty.\n\n" if synthetic else "")
    prov_lines = [f"- git commit: `{prov['git']['commit']}`" + (" (uncommitted changes)" if prov["git"]["dirty"] else ""),
                  f"- config hash: `{cfg.hash}` (preset `{cfg.preset}`)",
                  *[f"- data `{k}`: `{v[:16]}`" for k, v in prov["inputs"]["data"].items()],
                  "- packages: " + ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v),
                  f"- hardware: {prov['hardware']['cpu_count']} CPUs, CUDA: {prov['hardware'].get('cuda') or 'none'},"
                  f" {prov['hardware']['platform']}"]
    prov_lines.append("- code versions of the results: " + "; ".join(prov["code_versions"]))
    warn = "".join(f"> **Warning:** {w}\n\n" for w in prov["code_version_warnings"])
    times = _md_table(["stage", "wall time (s)"], [[s, _fmt(t, 1)] for s, t in stage_times])
    return (f"# densessl report ({cfg.preset})\n\n{warn}{note}" + "\n".join(sections) +
            "\n## Provenance\n\n" + "\n".join(prov_lines) + "\n\n### Wall time per stage\n\n" + times + "\n")


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_section(title: str, header: list[str], body: list[list[str]], margins: list[list[str]],
                  metrics: list[str], note: str | None = None) -> str:
    text = f"<h2>{html.escape(title)}</h2>{_html_table(header, body)}"
    if note:
        text += f"<p>{html.escape(note)}</p>"
    if margins:
        text += f"<p>{html.escape(MARGIN_NOTE)}</p>" + _html_table(["method", "arch", *metrics], margins)
        if _has_error_bars(margins):
            text += f"<p>{html.escape(ERROR_BAR_NOTE)}</p>"
    return text


def _html(cfg: Config, sections: list[str], prov: dict[str, Any], stage_times: list[tuple[str, Any]],
          synthetic: bool) -> str:
    note = ("<p><em>Synthetic data (smoke scale): numbers test the pipeline and the learning signal and are not "
            "comparable with published numbers.</em></p>" if synthetic else "")
    items = [f"git commit: {prov['git']['commit']}", f"config hash: {cfg.hash} (preset {cfg.preset})",
             *[f"data {k}: {v}" for k, v in prov["inputs"]["data"].items()],
             "packages: " + ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v),
             f"hardware: {prov['hardware']['cpu_count']} CPUs, CUDA: {prov['hardware'].get('cuda') or 'none'}"]
    items.append("code versions of the results: " + "; ".join(v.replace("`", "") for v in prov["code_versions"]))
    prov_html = "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"
    warn = "".join(f"<p><strong>Warning:</strong> {html.escape(w.replace('`', ''))}</p>"
                   for w in prov["code_version_warnings"])
    times = _html_table(["stage", "wall time (s)"], [[s, _fmt(t, 1)] for s, t in stage_times])
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>densessl report ({cfg.preset})</title>"
            f"<style>{style}</style></head><body><h1>densessl report ({html.escape(cfg.preset)})</h1>{warn}{note}"
            + "".join(sections) + f"<h2>Provenance</h2>{prov_html}<h3>Wall time per stage</h3>{times}</body></html>\n")
