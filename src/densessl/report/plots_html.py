"""The report's plots as one HTML section of inline SVG (matplotlib), the same bytes on every build.

Why inline SVG: index.html stays one self-contained file (no image files beside it, nothing fetched), text
stays text (``svg.fonttype: none``), and a test can find every plot and every series in the DOM: each figure
is a ``<figure class="densessl-plot" id="plot-...">`` and each series a ``<g id="<figure id>-s<panel>-<k>">``
(matplotlib writes an artist's gid as its group id). Reproducible: ``svg.hashsalt`` fixes the clip-path ids
matplotlib would otherwise draw at random, and the SVG metadata carries no date.
"""

from __future__ import annotations

import html
import io
from typing import Any

from densessl.config import Config
from densessl.report import plots as data
from densessl.report.plots import Figure

SECTION_ID = "plots"
GROUP_TITLES = {"pretraining": "Pretraining: loss and teacher entropy per step",
                "per-class": "Per-class IoU (ADE20K)",
                "davis": "DAVIS 2017: J&F per sequence",
                "published": "Ours against published"}
RC = {"svg.fonttype": "none", "svg.hashsalt": "densessl-report", "font.size": 9, "axes.grid": True,
      "grid.alpha": 0.3, "figure.dpi": 72}
MAX_TICK_LABELS = 40  # more categories than this (ADE20K's 150 classes): every n-th label only
# A paper-scale pretraining run logs tens of thousands of steps; a curve draws at most this many of them (every
# n-th and the last), which a 7.5-inch figure cannot tell apart, and keeps index.html a few MB at most.
MAX_POINTS = 2000


def stride_of(points: int) -> int:
    return max(1, -(-points // MAX_POINTS))


def thinned(x: list[Any], y: list[Any]) -> tuple[list[Any], list[Any], int]:
    """(every n-th x, the same y, n): the first and last point always kept."""
    stride = stride_of(len(x))
    keep = list(range(0, len(x), stride))
    if keep and keep[-1] != len(x) - 1:
        keep.append(len(x) - 1)
    return [x[i] for i in keep], [y[i] for i in keep], stride


def render_svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog or DOCTYPE, so it can sit inside HTML)."""
    import matplotlib
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no global figure state, no GUI backend

    with matplotlib.rc_context(RC):
        width = 7.5 if figure.kind == "line" else min(12.0, 6.0 + 0.12 * _categories(figure))
        fig = MplFigure(figsize=(width, 2.6 * len(figure.panels)))
        axes = fig.subplots(len(figure.panels), 1, squeeze=False)
        for p, (panel, ax) in enumerate(zip(figure.panels, axes[:, 0])):
            _draw_panel(figure, p, panel, ax)
        axes[-1, 0].set_xlabel(figure.xlabel)
        fig.suptitle(figure.title)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    # scales down to the page width (the viewBox keeps the proportions): ADE20K's 150 classes draw wide
    return text[text.index("<svg"):].strip().replace("<svg ", "<svg style='max-width:100%;height:auto' ", 1)


def _categories(figure: Figure) -> int:
    return max((len(s.x) for panel in figure.panels for s in panel.series), default=1)


def _draw_panel(figure: Figure, p: int, panel: data.Panel, ax: Any) -> None:
    if figure.kind == "line":
        for k, series in enumerate(panel.series):
            # markers where the points are few (a short run logs a handful of steps; one point draws no line)
            x, y, _ = thinned(series.x, series.y)
            (line,) = ax.plot(x, y, label=series.label, linewidth=1.2, marker="o" if len(x) < 30 else None,
                              markersize=3)
            line.set_gid(f"{figure.id}-s{p}-{k}")
    else:
        labels = list(dict.fromkeys(x for s in panel.series for x in s.x))  # first-seen order, each once
        position = {label: i for i, label in enumerate(labels)}
        n = len(panel.series)
        for k, series in enumerate(panel.series):
            points = [(position[x] + (k - (n - 1) / 2) * 0.4 / n, y)
                      for x, y in zip(series.x, series.y) if y is not None]
            (line,) = ax.plot([x for x, _ in points], [y for _, y in points], linestyle="none", marker="o",
                              markersize=4, label=series.label)
            line.set_gid(f"{figure.id}-s{p}-{k}")
        step = max(1, -(-len(labels) // MAX_TICK_LABELS))
        ax.set_xticks(range(0, len(labels), step))
        ax.set_xticklabels(labels[::step], rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6
                           else "center", fontsize=7)
    ax.set_ylabel(panel.ylabel)
    if figure.kind == "line":
        ax.legend(fontsize=7, loc="best")
    elif len(panel.series) > 1:  # beside the axes: points spread over the whole width
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def figure_html(figure: Figure) -> str:
    notes = list(figure.notes)
    if figure.kind == "line":
        lengths = [len(s.x) for panel in figure.panels for s in panel.series]
        stride = stride_of(max(lengths, default=0))
        if stride > 1:
            notes.append(f"drawn from every {stride}-th logged step (of up to {max(lengths)}).")
    notes_html = "".join(f"<p class='plot-note'>{html.escape(n)}</p>" for n in notes)
    return (f"<figure class='densessl-plot' id='{figure.id}' data-group='{figure.group}'>{render_svg(figure)}"
            f"<figcaption>{html.escape(figure.title)}</figcaption>{notes_html}</figure>")


def html_section(cfg: Config, cells: list[dict[str, Any]]) -> str:
    """The report's plots section: per group a heading, its figures, and one line per thing not drawn."""
    collected = data.collect(cfg, cells)
    parts = [f"<section id='{SECTION_ID}'><h2>Plots</h2>"]
    for group, title in GROUP_TITLES.items():
        figures = [f for f in collected.figures if f.group == group]
        notes = collected.notes.get(group, [])
        if not figures and not notes:
            continue  # the configuration has no such evaluation
        parts.append(f"<h3 id='{SECTION_ID}-{group}'>{html.escape(title)}</h3>")
        parts += [figure_html(f) for f in figures]
        parts += [f"<p class='plot-note' data-group='{group}'>{html.escape(n)}</p>" for n in notes]
    return "".join(parts) + "</section>"

