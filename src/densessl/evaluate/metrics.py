"""Segmentation metrics with the exact semantics of the reference implementations.

Two families live here:

* **mmseg IoU metrics** (mmsegmentation 1.x ``IoUMetric.intersect_and_union`` /
  ``total_area_to_metrics``, the metric Segmenter, arXiv 2105.05633, reports): per image,
  histograms of intersection, union, prediction and label areas over non-ignored pixels; the areas are
  summed over the whole validation set before dividing, so mIoU is *not* a mean of per-image IoUs.
* **Patch-Seg metrics** (iancovert/patch-seg @ fc14f36 ``patchseg/loss.py``): confusion matrices over
  every validation patch, then per-class recall / precision /
  F1 / accuracy and macro means over the classes that occur in the targets.

Both accumulate integer counts (int64), so the order of images and the batch size cannot change a result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _nanmean(x: np.ndarray) -> float:
    """``np.nanmean`` without the all-NaN RuntimeWarning (the answer is NaN, which is what we want)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(x)) if x.size else float("nan")


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with 0/0 -> NaN (as torch/numpy float division), without warnings."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


# ----------------------------------------------------------------------------------------------------------
# mmseg IoU metrics
# ----------------------------------------------------------------------------------------------------------

def reduce_zero_label_map(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 (other) -> 255 (ignored), every other id k -> k - 1.

    mmseg 1.x applies it in ``LoadAnnotations``; 0.x inside ``intersect_and_union``. Both do exactly
    ``label[label == 0] = 255; label = label - 1; label[label == 254] = 255``.
    """
    label = np.asarray(label).astype(np.int64, copy=True)
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


def _histc(values: np.ndarray, num_classes: int) -> np.ndarray:
    """``torch.histc(v, bins=n, min=0, max=n-1)`` on integer values: counts per id, out-of-range ignored."""
    values = values[(values >= 0) & (values < num_classes)]
    return np.bincount(values, minlength=num_classes).astype(np.float64)


def intersect_and_union(pred: Any, label: Any, num_classes: int, ignore_index: int = 255,
                        reduce_zero_label: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-image areas, mmseg semantics: (area_intersect, area_union, area_pred_label, area_label).

    ``pred`` and ``label`` are (H, W) integer maps (numpy or torch). Pixels whose (reduced) label equals
    ``ignore_index`` are dropped from everything, predictions included. Ids outside ``[0, num_classes)``
    fall out of the histograms, as with ``torch.histc`` in mmseg.
    """
    pred = _to_numpy(pred).astype(np.int64)
    label = _to_numpy(label).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    if reduce_zero_label:
        label = reduce_zero_label_map(label)
    mask = label != ignore_index
    pred = pred[mask]
    label = label[mask]
    intersect = pred[pred == label]
    area_intersect = _histc(intersect, num_classes)
    area_pred = _histc(pred, num_classes)
    area_label = _histc(label, num_classes)
    area_union = area_pred + area_label - area_intersect
    return area_intersect, area_union, area_pred, area_label


def total_area_to_metrics(total_area_intersect: np.ndarray, total_area_union: np.ndarray,
                          total_area_pred_label: np.ndarray, total_area_label: np.ndarray,
                          nan_to_num: float | None = None) -> dict[str, Any]:
    """mmseg ``total_area_to_metrics`` for 'mIoU', as fractions (mmseg's table multiplies by 100).

    Returns ``aAcc`` (pixel accuracy over all non-ignored pixels), per-class ``IoU`` and ``Acc`` arrays
    (NaN where union / label area is 0, i.e. the class never occurs in labels or predictions), and ``mIoU`` /
    ``mAcc`` as NaN-skipping means, which is how mmseg summarises (``np.nanmean``).
    """
    inter = np.asarray(total_area_intersect, dtype=np.float64)
    union = np.asarray(total_area_union, dtype=np.float64)
    label = np.asarray(total_area_label, dtype=np.float64)
    iou = _div(inter, union)
    acc = _div(inter, label)
    a_acc = float(_div(inter.sum(), label.sum()))
    if nan_to_num is not None:
        iou = np.nan_to_num(iou, nan=nan_to_num)
        acc = np.nan_to_num(acc, nan=nan_to_num)
    return {"aAcc": a_acc, "IoU": iou, "Acc": acc, "mIoU": _nanmean(iou), "mAcc": _nanmean(acc)}


@dataclass
class IoUAccumulator:
    """Sums :func:`intersect_and_union` over a validation set (what mmseg's ``IoUMetric`` does)."""

    num_classes: int
    ignore_index: int = 255
    reduce_zero_label: bool = False
    area_intersect: np.ndarray = field(init=False)
    area_union: np.ndarray = field(init=False)
    area_pred_label: np.ndarray = field(init=False)
    area_label: np.ndarray = field(init=False)
    num_images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        z = np.zeros(self.num_classes, dtype=np.float64)
        self.area_intersect, self.area_union = z.copy(), z.copy()
        self.area_pred_label, self.area_label = z.copy(), z.copy()
        self.num_images = 0

    def update(self, pred: Any, label: Any) -> None:
        i, u, p, lab = intersect_and_union(pred, label, self.num_classes, self.ignore_index,
                                           self.reduce_zero_label)
        self.area_intersect += i
        self.area_union += u
        self.area_pred_label += p
        self.area_label += lab
        self.num_images += 1

    def compute(self, nan_to_num: float | None = None) -> dict[str, Any]:
        return total_area_to_metrics(self.area_intersect, self.area_union, self.area_pred_label,
                                     self.area_label, nan_to_num)


# ----------------------------------------------------------------------------------------------------------
# Patch-Seg metrics
# ----------------------------------------------------------------------------------------------------------

class MultilabelConfusion:
    """One 2x2 confusion matrix per class (union / global-union), rows = target, columns = prediction.

    A (patch, class) decision is positive iff ``sigmoid(logit) > threshold`` (0.5), computed in the logits'
    dtype as the official ``UnionMetricsHelper`` does.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5) -> None:
        self.num_classes = num_classes
        self.threshold = threshold
        self.counts = np.zeros((num_classes, 2, 2), dtype=np.int64)

    def reset(self) -> None:
        self.counts[:] = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` (..., C) raw scores; ``targets`` (..., C) 0/1."""
        pred = (torch.sigmoid(logits.detach()) > self.threshold).reshape(-1, self.num_classes)
        tgt = (targets.detach() > 0.5).reshape(-1, self.num_classes)
        self.update_from_predictions(pred, tgt)

    def update_from_predictions(self, pred: torch.Tensor, tgt: torch.Tensor) -> None:
        """Boolean (N, C) predictions and targets."""
        pred, tgt = pred.bool(), tgt.bool()
        tp = (pred & tgt).sum(0)
        fp = (pred & ~tgt).sum(0)
        fn = (~pred & tgt).sum(0)
        tn = (~pred & ~tgt).sum(0)
        self.counts[:, 1, 1] += tp.cpu().numpy()
        self.counts[:, 0, 1] += fp.cpu().numpy()
        self.counts[:, 1, 0] += fn.cpu().numpy()
        self.counts[:, 0, 0] += tn.cpu().numpy()

    def compute(self) -> dict[str, Any]:
        return multilabel_metrics(self.counts)


class MulticlassConfusion:
    """C x C confusion matrix (majority), rows = target, columns = argmax prediction."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.counts[:] = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` (..., C); ``targets`` (...) class ids. Official: argmax of the softmax."""
        logits = logits.detach().reshape(-1, self.num_classes)
        pred = logits.softmax(dim=-1).argmax(dim=-1)
        self.update_from_predictions(pred, targets.detach().reshape(-1))

    def update_from_predictions(self, pred: torch.Tensor, tgt: torch.Tensor) -> None:
        c = self.num_classes
        flat = tgt.long().reshape(-1) * c + pred.long().reshape(-1)
        self.counts += torch.bincount(flat.cpu(), minlength=c * c).reshape(c, c).numpy()

    def compute(self) -> dict[str, Any]:
        return multiclass_metrics(self.counts)


def _summarise(recall: np.ndarray, precision: np.ndarray, accuracy: np.ndarray, valid: np.ndarray,
               micro_accuracy: float) -> dict[str, Any]:
    """Per-class values -> the official macro metrics plus NaN-aware variants (see :func:`multilabel_metrics`)."""
    f1 = 2 * precision * recall / (precision + recall + 1e-6)

    def official(x: np.ndarray) -> float:  # like torch.mean: NaN in -> NaN out; no valid class -> NaN
        return float(np.mean(x[valid])) if valid.any() else float("nan")

    return {
        "accuracy": float(micro_accuracy),
        "macro_accuracy": official(accuracy),
        "macro_recall": official(recall),
        "macro_precision": official(precision),
        "macro_f1": official(f1),
        "macro_precision_nanmean": _nanmean(precision[valid]),
        "macro_f1_nanmean": _nanmean(f1[valid]),
        "num_valid_classes": int(valid.sum()),
        "per_class": {"recall": recall, "precision": precision, "f1": f1, "accuracy": accuracy, "valid": valid},
    }


def multilabel_metrics(counts: np.ndarray) -> dict[str, Any]:
    """Patch-Seg union / global-union metrics from per-class 2x2 counts ``(C, 2, 2)`` [target, pred].

    Per class c (official ``MultilabelMetricsHelper``): recall = TP/(TP+FN), precision = TP/(TP+FP),
    F1 = 2PR/(P+R+1e-6), accuracy = (TP+TN)/total. Valid classes have >= 1 positive target. Returned:

    * ``accuracy``: micro accuracy over every (patch, class) decision, sum(TP+TN)/sum(total).
    * ``macro_accuracy`` / ``macro_recall``: plain means over valid classes (recall is always defined there).
    * ``macro_precision`` / ``macro_f1``: the **official** plain mean over valid classes. A valid class that
      is never predicted has precision 0/0 = NaN (and so F1 NaN), which makes these NaN, exactly as
      ``torch.mean`` does in the official code and CSV (iancovert/patch-seg ``patchseg/loss.py``).
    * ``macro_precision_nanmean`` / ``macro_f1_nanmean``: NaN-aware means over valid classes, i.e. classes
      with no positive prediction are skipped. These are the usable numbers; report both.
    * ``num_valid_classes`` and ``per_class`` arrays (recall, precision, f1, accuracy, valid).

    All means are NaN when no class is valid.
    """
    counts = np.asarray(counts, dtype=np.int64)
    tn, fp, fn, tp = counts[:, 0, 0], counts[:, 0, 1], counts[:, 1, 0], counts[:, 1, 1]
    total = counts.sum(axis=(1, 2))
    recall = _div(tp, tp + fn)
    precision = _div(tp, tp + fp)
    accuracy = _div(tp + tn, total)
    valid = (tp + fn) > 0
    micro = float(_div((tp + tn).sum(), total.sum()))
    return _summarise(recall, precision, accuracy, valid, micro)


def multiclass_metrics(cmat: np.ndarray) -> dict[str, Any]:
    """Patch-Seg majority metrics from a ``(C, C)`` [target, pred] confusion matrix.

    Official ``MajorityMetricsHelper``: recall = diag/row sum, precision = diag/column sum, F1 as above,
    per-class accuracy = (TP + TN)/total with TN = total - row - column + TP; valid classes occur in the
    targets; ``accuracy`` = trace/total. Same keys and NaN conventions as :func:`multilabel_metrics`.
    """
    cmat = np.asarray(cmat, dtype=np.int64)
    tp = np.diag(cmat)
    rows, cols, total = cmat.sum(1), cmat.sum(0), cmat.sum()
    recall = _div(tp, rows)
    precision = _div(tp, cols)
    accuracy = _div(tp + (total - rows - cols + tp), np.full_like(tp, total))
    valid = rows > 0
    micro = float(_div(tp.sum(), total))
    return _summarise(recall, precision, accuracy, valid, micro)


class SizeUnionConfusion:
    """Union decisions pooled by object size: the official ``SizeUnionMetricsHelper`` (iancovert/patch-seg
    ``patchseg/loss.py``; its notebook ``plot-stratified-metrics.ipynb`` plots it).

    For each image and class, the class's size is the fraction of the image's patches whose union target has
    it; ``torch.bucketize`` on the inner edges of ``linspace(0, 1, num_buckets + 1)`` (float32, right=False:
    a size equal to an edge falls in the lower bin) assigns the class a bin, and every (patch, class) decision
    of that class in that image goes into the bin's one 2x2 matrix. A class absent from the image has size 0
    and lands in bin 0, so bin 0 also pools the negatives (and false positives) of absent classes, as in the
    official code. Per bin: recall, precision, F1, accuracy exactly as :func:`multilabel_metrics` per class.
    """

    def __init__(self, num_buckets: int = 10, threshold: float = 0.5) -> None:
        self.num_buckets = num_buckets
        self.threshold = threshold
        self.edges = torch.linspace(0, 1, steps=num_buckets + 1)
        self.counts = np.zeros((num_buckets, 2, 2), dtype=np.int64)

    def reset(self) -> None:
        self.counts[:] = 0

    def bins(self, targets: torch.Tensor) -> torch.Tensor:
        """(B, P, C) 0/1 targets -> (B, C) bin of each class in each image."""
        pct = targets.float().sum(dim=1) / targets.shape[1]
        return torch.bucketize(pct, self.edges[1:-1])

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` (B, P, C) (or (B, g, g, C)); ``targets`` the union targets of the same shape."""
        b, c = logits.shape[0], logits.shape[-1]
        logits = logits.detach().float().cpu().reshape(b, -1, c)
        targets = (targets.detach().cpu().reshape(b, -1, c) > 0.5)
        pred = torch.sigmoid(logits) > self.threshold
        bins = self.bins(targets).reshape(-1)  # (B*C,)
        for cell, hit in (((1, 1), pred & targets), ((0, 1), pred & ~targets), ((1, 0), ~pred & targets),
                          ((0, 0), ~pred & ~targets)):
            per_class = hit.sum(dim=1).reshape(-1)  # (B*C,) decisions of each class in each image
            self.counts[:, cell[0], cell[1]] += torch.bincount(bins, weights=per_class.double(),
                                                               minlength=self.num_buckets).long().numpy()

    def compute(self) -> dict[str, Any]:
        """Per-bin ``recall`` / ``precision`` / ``f1`` / ``accuracy`` lists (NaN where undefined), the bin
        ``edges`` and the raw ``counts`` ([bin][target][pred])."""
        m = multilabel_metrics(self.counts)["per_class"]
        return {"edges": self.edges.tolist(), "recall": m["recall"].tolist(), "precision": m["precision"].tolist(),
                "f1": m["f1"].tolist(), "accuracy": m["accuracy"].tolist(), "counts": self.counts.tolist()}
