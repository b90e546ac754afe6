"""The papers' tables as Markdown and HTML, rebuilt cell by cell from :mod:`densessl.report.cells`.

Each published table keeps the paper's rows and columns; a cell reads "ours / published (difference)", with
"not run", "not configured" or "–" (no job of this project; the reason is listed under the table) in place of
ours. Seed replicas show as mean ± standard deviation. The HTML puts each value's provenance (runs, checkpoint
hash, data fingerprint, commit) in the cell's tooltip; tables.json carries it per cell.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from densessl.report.cells import Cell, GainResult, RowStat
from densessl.report.paper_tables import CellPlan, PaperTable, accounting

NOTE = ("Each cell: ours / published (ours − published). \"not run\": the job is in the DAG and has not written "
        "its metrics yet; \"not configured\": this configuration lists no such run or protocol (reason below); "
        "\"–\": no job of this project reproduces the row (reason below). ± is the standard deviation over seed "
        "replicas.")
SYNTHETIC_NOTE = ("Synthetic data (smoke scale): no run is compared with a published number, so every number a "
                  "run key names is \"not configured\" here (the rest have no job of this project, with their "
                  "reasons); docs/report.md gives the paper preset's counts.")


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _published(value: float) -> str:
    return f"{value:g}"


def stat_text(stat: RowStat | None, status: str, digits: int = 2) -> str:
    if stat is None or stat.status != "ok":
        shown = stat.status if stat is not None else ("not run" if status == "matched" else status)
        return "–" if shown == "unmatched" else shown
    text = fmt(stat.mean, digits)
    if stat.n >= 2:
        text += f" ± {fmt(stat.sd, digits)} ({stat.n} seeds)"
    return text


@dataclass
class TableView:
    header: list[str]
    body: list[list[str]]
    tooltips: list[list[str]]       # per body cell (HTML title)
    reasons: list[str]              # one line per row without a job, and the notes of rows with one


def table_view(table: PaperTable, plans: dict[tuple[int, str], CellPlan], stats: dict[tuple[str, int, str], RowStat],
               cells: dict[tuple[int, str], list[Cell]]) -> TableView:
    header = ["row (as published)", "our runs", *[c.name for c in table.columns]]
    body, tips, reasons = [], [], []
    for row in table.rows:
        runs = sorted({c.run for col in table.columns for c in cells.get((row.index, col.name), []) if c.run})
        line, tip = [row.label, ", ".join(runs) or "–"], ["", ""]
        row_reasons: list[str] = []
        for column in table.columns:
            plan = plans.get((row.index, column.name))
            if plan is None:  # not published (null in the paper's table)
                line.append("")
                tip.append("")
                continue
            stat = stats.get((table.id, row.index, column.name))
            digits = 2 if column.scale == 1.0 else 4  # a fraction column (DAVIS script check) needs 4
            ours = stat_text(stat, plan.status, digits)
            text = f"{ours} / {_published(plan.published)}"
            if stat is not None and stat.status == "ok" and stat.mean is not None:
                text += f" ({stat.mean - plan.published:+.{digits}f})"
            line.append(text)
            tip.append("; ".join(_provenance_text(c) for c in cells.get((row.index, column.name), [])
                                 if c.provenance))
            if plan.reason and plan.reason not in row_reasons:
                row_reasons.append(plan.reason)
        body.append(line)
        tips.append(tip)
        reasons += [f"{row.label}: {r}" for r in row_reasons]
        if row.note and runs:  # what the row's job differs in (e.g. LOCA's zoo recipe is unpublished)
            reasons.append(f"{row.label}: {row.note}")
    return TableView(header, body, tips, reasons)


def _provenance_text(cell: Cell) -> str:
    p = cell.provenance or {}
    release = f" ({p['release_checksum']})" if p.get("release_checksum") else ""
    return (f"{p.get('run')} seed {cell.seed}: checkpoint {str(p.get('checkpoint_sha256'))[:12]}{release}, data "
            f"{str(p.get('data_fingerprint'))[:12]}, commit {str(p.get('commit'))[:12]}")


def _group(tables: tuple[PaperTable, ...], plans: list[CellPlan], cells: list[Cell]
           ) -> tuple[dict[str, dict[tuple[int, str], CellPlan]], dict[str, dict[tuple[int, str], list[Cell]]]]:
    plan_of: dict[str, dict[tuple[int, str], CellPlan]] = {t.id: {} for t in tables}
    for p in plans:
        plan_of[p.table][(p.row, p.column)] = p
    cells_of: dict[str, dict[tuple[int, str], list[Cell]]] = {t.id: {} for t in tables}
    for c in cells:
        if c.row is not None and c.column is not None:
            cells_of[c.table].setdefault((c.row, c.column), []).append(c)
    return plan_of, cells_of


def _counts_rows(tables: tuple[PaperTable, ...], plans: list[CellPlan]) -> list[list[str]]:
    rows = []
    for t in tables:
        counts = accounting([p for p in plans if p.table == t.id])
        rows.append([t.id, str(counts["published"]), str(counts["matched"]), str(counts["not configured"]),
                     str(counts["unmatched"])])
    total = accounting(plans)
    rows.append(["all tables", str(total["published"]), str(total["matched"]), str(total["not configured"]),
                 str(total["unmatched"])])
    return rows


COUNTS_HEADER = ["table", "published numbers", "matched to a job", "not configured here", "no job (reason given)"]
GAINS_HEADER = ["claim", "metric", "published gain", "our gain", "test", "verdict"]


def _gain_rows(results: list[GainResult]) -> list[list[str]]:
    rows = []
    for g in results:
        ours = "–" if g.value is None else f"{g.value:+.2f}" + (
            f" ± {g.standard_error:.2f}" if g.standard_error is not None else "")
        test = "–" if g.test is None else g.test + (f": p = {g.p_value:.3f}" if g.p_value is not None else "")
        verdict = g.verdict + (f" ({g.reason})" if g.reason else "")
        rows.append([f"{g.table}: {g.row_label}", g.column, f"{g.published:+g}", ours, test, verdict])
    return rows


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def markdown(tables: tuple[PaperTable, ...], plans: list[CellPlan], cells: list[Cell],
             stats: dict[tuple[str, int, str], RowStat], gain_results: list[GainResult], synthetic: bool) -> str:
    parts = ["## The papers' tables\n"]
    parts.append(_md_table(COUNTS_HEADER, _counts_rows(tables, plans)) + "\n")
    if synthetic:
        return "\n".join([*parts, SYNTHETIC_NOTE + "\n"])
    parts.append(NOTE + "\n")
    plan_of, cells_of = _group(tables, plans, cells)
    for t in tables:
        if t.is_delta:
            continue
        view = table_view(t, plan_of[t.id], stats, cells_of[t.id])
        protocols = sorted({c.protocol for c in t.columns if c.protocol})
        where = ", ".join(f"`{p}`" for p in protocols) or "no protocol of ours"
        parts.append(f"### {t.title} (`{t.id}`)\n\nSource: {t.source}. Evaluated by {where}"
                     + (f", schedule {t.schedule}" if t.schedule else "") + ".\n")
        parts.append(_md_table(view.header, view.body) + "\n")
        if view.reasons:
            parts.append("\n".join(f"- {r}" for r in view.reasons) + "\n")
    parts.append("### Claimed gains (the abstracts' deltas), from the rows they compare\n")
    parts.append(_md_table(GAINS_HEADER, _gain_rows(gain_results)) + "\n")
    return "\n".join(parts)


def _html_table(header: list[str], body: list[list[str]], tips: list[list[str]] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for i, row in enumerate(body):
        tds = []
        for j, c in enumerate(row):
            tip = tips[i][j] if tips else ""
            title = f" title=\"{html.escape(tip)}\"" if tip else ""
            tds.append(f"<td{title}>{html.escape(c)}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def html_section(tables: tuple[PaperTable, ...], plans: list[CellPlan], cells: list[Cell],
                 stats: dict[tuple[str, int, str], RowStat], gain_results: list[GainResult], synthetic: bool) -> str:
    parts = ["<h2>The papers' tables</h2>", _html_table(COUNTS_HEADER, _counts_rows(tables, plans))]
    if synthetic:
        return "".join([*parts, f"<p>{html.escape(SYNTHETIC_NOTE)}</p>"])
    parts.append(f"<p>{html.escape(NOTE)} Hover a value for its provenance.</p>")
    plan_of, cells_of = _group(tables, plans, cells)
    for t in tables:
        if t.is_delta:
            continue
        view = table_view(t, plan_of[t.id], stats, cells_of[t.id])
        parts.append(f"<h3>{html.escape(t.title)} ({html.escape(t.id)})</h3><p>Source: {html.escape(t.source)}"
                     + (f", schedule {html.escape(t.schedule)}" if t.schedule else "") + "</p>")
        parts.append(_html_table(view.header, view.body, view.tooltips))
        if view.reasons:
            parts.append("<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in view.reasons) + "</ul>")
    parts.append("<h3>Claimed gains (the abstracts' deltas), from the rows they compare</h3>")
    parts.append(_html_table(GAINS_HEADER, _gain_rows(gain_results)))
    return "".join(parts)
