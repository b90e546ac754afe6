"""Patch-Seg's official output format: the rows ``scripts/train.py`` (``save_results``) appends to
``results/outputs-{dataset}.csv`` (iancovert/patch-seg @ fc14f36)."""

from __future__ import annotations

from typing import Any

CSV_COLUMNS = ("dataset", "label_reduction", "output_head", "backbone", "skip_blocks", "full_finetune",
               "num_epochs", "loss", "accuracy", "macro_accuracy", "macro_recall", "macro_precision", "macro_f1")


def csv_header() -> str:
    """The official ``save_results`` header line of ``results/outputs-{dataset}.csv`` (", "-separated)."""
    return ", ".join(CSV_COLUMNS) + "\n"


def csv_row(metrics: dict[str, Any], backbone: str) -> str:
    """One official ``outputs-{dataset}.csv`` line for a run's best epoch.

    Columns, order and the ", " separator are ``scripts/train.py``'s ``save_results``; ``full_finetune`` is
    Python's ``True``/``False``. The official metric columns are 0-d tensors formatted by an f-string
    (``tensor(0.9876)``); here they are the plain numbers (``repr`` of the float, ``nan`` for NaN), which
    pandas reads as floats. ``backbone`` is the official ``--backbone`` column: our run id or timm name.
    """
    cfg = metrics["config"]
    values = [metrics["dataset"], metrics["label_reduction"], metrics["output_head"], backbone,
              cfg["skip_blocks"], bool(cfg["full_finetune"]), metrics["num_epochs"], metrics["loss"],
              metrics["accuracy"], metrics["macro_accuracy"], metrics["macro_recall"], metrics["macro_precision"],
              metrics["macro_f1"]]
    return ", ".join(str(v) for v in values) + "\n"
