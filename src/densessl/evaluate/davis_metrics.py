"""DAVIS 2017 semi-supervised scores: region similarity J and boundary measure F.

Re-implements davisvideochallenge/davis2017-evaluation @ ac7c43f (``evaluation_method.py --task
semi-supervised``) without OpenCV, scikit-image or pandas, with the same numbers:

* ``davis2017/metrics.py`` ``db_eval_iou``: J = |S & G| / |S | G|, 1 when the union is empty.
* ``davis2017/metrics.py`` ``f_measure`` / ``_seg2bmap``: 1-px boundaries (XOR with the E, S and SE
  neighbours, last row/column special-cased), both dilated by ``skimage.morphology.disk(r)`` with
  ``cv2.dilate`` (here: an exact row decomposition of the same disk, see :func:`dilate_disk`),
  r = ceil(bound_th * ||(H, W)||) for bound_th < 1, else bound_th pixels.
* ``davis2017/utils.py`` ``db_statistics``: Mean = nanmean, Recall = nanmean(x > 0.5), Decay = mean of the
  first of 4 overlapping bins minus mean of the last.
* ``davis2017/evaluation.py`` ``DAVISEvaluation.evaluate``: GT void (255) -> 0, objects = max id of the
  first GT frame, first and last frames excluded, result objects beyond the GT count rejected, missing
  result objects zero-padded; statistics per object.
* ``evaluation_method.py``: global means over all objects, J&F-Mean = (mean J-Mean + mean F-Mean) / 2;
  ``global_results-<set>.csv`` and ``per-sequence_results-<set>.csv`` with ``%.3f`` floats.

The semi-supervised path passes void masks computed from the per-object binary GT masks (``== 255``),
which are never true, so void pixels play no role; the void arguments are kept for the functions' API.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import maximum_filter1d

from densessl.data.davis import Davis2017
from densessl.errors import ConfigError, DataError
from densessl.evaluate.davis_config import BOUND_TH
from densessl.io import write_text

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
PER_SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
FLOAT_FORMAT = "%.3f"  # evaluation_method.py to_csv(float_format="%.3f")


def global_csv_name(split: str) -> str:
    return f"global_results-{split}.csv"


def per_sequence_csv_name(split: str) -> str:
    return f"per-sequence_results-{split}.csv"


# ----------------------------------------------------------------------------------------------------------
# Per-frame measures
# ----------------------------------------------------------------------------------------------------------

def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray,
                void_pixels: np.ndarray | None = None) -> np.ndarray:
    """J of binary masks (..., H, W) -> (...); 1 where the union is empty (official ``db_eval_iou``)."""
    if annotation.shape != segmentation.shape:
        raise DataError(f"annotation {annotation.shape} and segmentation {segmentation.shape} sizes differ")
    ann = annotation.astype(bool)
    seg = segmentation.astype(bool)
    keep = np.ones_like(seg) if void_pixels is None else ~void_pixels.astype(bool)
    inters = np.sum(seg & ann & keep, axis=(-2, -1))
    union = np.sum((seg | ann) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.asarray(inters / union, dtype=np.float64)
    j[np.isclose(union, 0)] = 1.0
    return j


def boundary_radius(shape_hw: Sequence[int], bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ceil(bound_th * image diagonal), or bound_th itself when >= 1."""
    if bound_th <= 0:
        raise ConfigError(f"bound_th={bound_th} must be > 0 (official 0.008)")
    if bound_th >= 1:
        if float(bound_th) != int(bound_th):
            # skimage.disk(2.5) has an even side and cv2.dilate then anchors it off-centre; not supported.
            raise ConfigError(f"bound_th={bound_th} >= 1 is a radius in pixels and must be a whole number")
        return int(bound_th)
    return int(np.ceil(bound_th * np.linalg.norm(np.asarray(shape_hw[-2:], dtype=np.float64))))


def disk(radius: int) -> np.ndarray:
    """``skimage.morphology.disk(radius)``: offsets with x^2 + y^2 <= r^2, as a (2r+1, 2r+1) uint8 array."""
    r = int(radius)
    ax = np.arange(-r, r + 1)
    x, y = np.meshgrid(ax, ax)
    return (x ** 2 + y ** 2 <= r ** 2).astype(np.uint8)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-px boundary map of binary masks (..., H, W), offset half a pixel towards the origin.

    Official ``_seg2bmap`` (David Martin's code) at full size: a pixel is boundary where it differs from its
    east, south or south-east neighbour; the last row compares east only, the last column south only, and
    the bottom-right pixel is never boundary.
    """
    seg = np.asarray(seg).astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def dilate_disk(masks: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of (..., H, W) masks by ``disk(radius)``; pixels outside the image count as 0.

    Same result as ``cv2.dilate(mask, disk(r))`` (the disk is symmetric, so the anchor does not matter):
    the disk is the union of its rows, row dy spanning |dx| <= isqrt(r^2 - dy^2), so the dilation is an OR
    over dy of a vertical shift of a 1-D horizontal maximum filter. Exact, and far faster than a 2-D
    structuring element of 289 pixels at r = 8.
    """
    b = np.asarray(masks).astype(bool)
    r = int(radius)
    if r <= 0:
        return b.copy()
    h = b.shape[-2]
    src = b.view(np.uint8)
    out = np.zeros_like(b)
    for dy in range(0, r + 1):
        if dy >= h:
            break
        half = math.isqrt(r * r - dy * dy)
        row = maximum_filter1d(src, size=2 * half + 1, axis=-1, mode="constant", cval=0).astype(bool)
        if dy == 0:
            out |= row
            continue
        out[..., : h - dy, :] |= row[..., dy:, :]  # source row y + dy
        out[..., dy:, :] |= row[..., : h - dy, :]  # source row y - dy
    return out


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None,
                     bound_th: float = BOUND_TH) -> np.ndarray:
    """F of binary masks (..., H, W) -> (...) (official ``db_eval_boundary`` / ``f_measure``).

    Edge cases as official: no predicted and no GT boundary -> P = R = 1 (F = 1); no prediction, GT present
    -> P = 1, R = 0 (F = 0); prediction, no GT -> P = 0, R = 1 (F = 0).
    """
    if annotation.shape != segmentation.shape:
        raise DataError(f"annotation {annotation.shape} and segmentation {segmentation.shape} sizes differ")
    r = boundary_radius(segmentation.shape, bound_th)
    keep = True if void_pixels is None else ~void_pixels.astype(bool)
    fg_boundary = seg2bmap(segmentation.astype(bool) & keep)
    gt_boundary = seg2bmap(annotation.astype(bool) & keep)
    fg_dil = dilate_disk(fg_boundary, r)
    gt_dil = dilate_disk(gt_boundary, r)
    n_fg = fg_boundary.sum(axis=(-2, -1)).astype(np.float64)
    n_gt = gt_boundary.sum(axis=(-2, -1)).astype(np.float64)
    fg_match = (fg_boundary & gt_dil).sum(axis=(-2, -1))
    gt_match = (gt_boundary & fg_dil).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_fg > 0, fg_match / np.maximum(n_fg, 1), 1.0)
        recall = np.where(n_gt > 0, gt_match / np.maximum(n_gt, 1), 1.0)
        total = precision + recall
        f = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return np.asarray(f, dtype=np.float64)


def f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, void_pixels: np.ndarray | None = None,
              bound_th: float = BOUND_TH) -> float:
    """F of one frame (argument order of the official ``f_measure``: prediction first)."""
    return float(db_eval_boundary(gt_mask, foreground_mask, void_pixels, bound_th))


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame values (official ``utils.db_statistics``).

    Decay: 4 bins with edges ``round(linspace(1, n, 5) + 1e-10) - 1``; bin i spans ``[ids[i], ids[i+1]]``
    (inclusive, so neighbouring bins share a frame); Decay = nanmean(bin 0) - nanmean(bin 3). The official
    code casts the edges to uint8, which would wrap for sequences over 255 frames; DAVIS has none, and we
    keep int64.
    """
    values = np.asarray(per_frame_values, dtype=np.float64)
    if values.size == 0:  # official: every statistic of an empty series is NaN
        return math.nan, math.nan, math.nan
    n_bins = 4
    ids = (np.round(np.linspace(1, len(values), n_bins + 1) + 1e-10) - 1).astype(np.int64)
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(n_bins)]
    with warnings.catch_warnings():  # all-NaN slices give NaN silently, as official
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


# ----------------------------------------------------------------------------------------------------------
# Sequences and results folders
# ----------------------------------------------------------------------------------------------------------

def split_objects(labels: np.ndarray, num_objects: int) -> np.ndarray:
    """(T, H, W) ids -> (num_objects, T, H, W) bool, object k+1 in row k."""
    ids = np.arange(1, num_objects + 1, dtype=np.int64).reshape(-1, *([1] * labels.ndim))
    return labels[None].astype(np.int64) == ids


def evaluate_sequence(gt_labels: np.ndarray, res_labels: np.ndarray, num_objects: int,
                      bound_th: float = BOUND_TH, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame (J, F), each (num_objects, T), for id maps of the evaluated frames.

    ``num_objects`` is the GT count (max id of the first GT frame). The result's object count is its max
    id over the evaluated frames; more than the GT count is an error (official: message + ``sys.exit``),
    fewer is zero-padded.
    """
    if gt_labels.shape != res_labels.shape:
        raise DataError(f"sequence {name!r}: result masks {res_labels.shape[1:]} and annotations "
                        f"{gt_labels.shape[1:]} differ in size; write results at the annotations' size")
    n_res = int(res_labels.max()) if res_labels.size else 0
    if n_res > num_objects:
        raise DataError(f"sequence {name!r}: the results contain object id {n_res} but the first annotation "
                        f"has only {num_objects} objects (official message: 'In your PNG files there is an "
                        f"index higher than the number of objects in the sequence!')")
    gt = split_objects(gt_labels, num_objects)
    res = split_objects(res_labels, num_objects)  # ids absent from the results give all-False rows (padding)
    j = np.zeros(gt.shape[:2])
    f = np.zeros(gt.shape[:2])
    for k in range(num_objects):
        j[k] = db_eval_iou(gt[k], res[k])
        f[k] = db_eval_boundary(gt[k], res[k], bound_th=bound_th)
    return j, f


def read_result_masks(results_dir: Path, sequence: str, frame_ids: Sequence[str]) -> np.ndarray:
    """(T, H, W) ids of ``<results_dir>/<sequence>/<frame>.png`` (official ``Results.read_masks``)."""
    frames = []
    for fid in frame_ids:
        path = Path(results_dir) / sequence / f"{fid}.png"
        if not path.is_file():
            raise DataError(f"{path}: result mask not found; results must be indexed PNGs named like the "
                            f"annotations, in <results>/<sequence>/ (run the propagation first)")
        try:
            with Image.open(path) as im:
                arr = np.array(im)
        except Exception as exc:
            raise DataError(f"{path}: cannot read result mask ({exc}); re-run the propagation") from exc
        if arr.ndim != 2:
            raise DataError(f"{path}: result mask has shape {arr.shape}; write single-channel indexed PNGs "
                            f"of object ids, not colour images")
        if frames and arr.shape != frames[0].shape:
            raise DataError(f"{path}: size {arr.shape} differs from the sequence's first result mask "
                            f"{frames[0].shape}")
        frames.append(arr)
    return np.stack(frames) if frames else np.zeros((0, 0, 0), np.uint8)


@dataclass
class DavisScores:
    """Per-object statistics in the order the official evaluator appends them (sequence, then object)."""

    split: str
    objects: list[str] = field(default_factory=list)  # "<sequence>_<id>"
    j: dict[str, list[float]] = field(default_factory=lambda: {"M": [], "R": [], "D": []})
    f: dict[str, list[float]] = field(default_factory=lambda: {"M": [], "R": [], "D": []})

    def add(self, sequence: str, j_frames: np.ndarray, f_frames: np.ndarray) -> None:
        for k in range(j_frames.shape[0]):
            self.objects.append(f"{sequence}_{k + 1}")
            for store, values in ((self.j, j_frames[k]), (self.f, f_frames[k])):
                m, r, d = db_statistics(values)
                store["M"].append(m)
                store["R"].append(r)
                store["D"].append(d)

    def global_metrics(self) -> dict[str, float]:
        """The 7 official global numbers (fractions): means over all objects."""
        def mean(values: list[float]) -> float:
            return float(np.mean(values)) if values else math.nan

        j_mean, f_mean = mean(self.j["M"]), mean(self.f["M"])
        values = ((j_mean + f_mean) / 2.0, j_mean, mean(self.j["R"]), mean(self.j["D"]),
                  f_mean, mean(self.f["R"]), mean(self.f["D"]))
        return dict(zip(GLOBAL_COLUMNS, values))

    def per_object(self) -> dict[str, dict[str, float]]:
        return {name: {"J-Mean": jm, "F-Mean": fm}
                for name, jm, fm in zip(self.objects, self.j["M"], self.f["M"])}


def evaluate_results(results_dir: str | Path, dataset: Davis2017, bound_th: float = BOUND_TH) -> DavisScores:
    """Score a results folder against every sequence of ``dataset`` (semi-supervised task)."""
    scores = DavisScores(split=dataset.split)
    for seq in dataset:
        ids, gt = seq.gt_labels()
        num_objects = int(gt[0].max())
        ids, gt = ids[1:-1], gt[1:-1]  # first and last frames excluded (official [:, 1:-1])
        res = read_result_masks(Path(results_dir), seq.name, ids) if ids else np.zeros_like(gt)
        j, f = evaluate_sequence(gt, res, num_objects, bound_th, seq.name)
        scores.add(seq.name, j, f)
    return scores


# ----------------------------------------------------------------------------------------------------------
# Official CSV files
# ----------------------------------------------------------------------------------------------------------

def _fmt(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else FLOAT_FORMAT % value  # pandas writes NaN as ""


def global_csv_text(metrics: dict[str, float]) -> str:
    return ",".join(GLOBAL_COLUMNS) + "\n" + ",".join(_fmt(metrics[c]) for c in GLOBAL_COLUMNS) + "\n"


def per_sequence_csv_text(scores: DavisScores) -> str:
    lines = [",".join(PER_SEQUENCE_COLUMNS)]
    for name, jm, fm in zip(scores.objects, scores.j["M"], scores.f["M"]):
        lines.append(f"{name},{_fmt(jm)},{_fmt(fm)}")
    return "\n".join(lines) + "\n"


def write_csvs(results_dir: str | Path, scores: DavisScores) -> tuple[Path, Path]:
    """Write both official CSVs into ``results_dir`` (where evaluation_method.py writes them).

    They are always recomputed and overwritten: the official tool instead reads existing CSVs back and
    skips the evaluation when ``global_results-<set>.csv`` and ``per-sequence_results-<set>.csv`` exist.
    """
    results_dir = Path(results_dir)
    g = results_dir / global_csv_name(scores.split)
    s = results_dir / per_sequence_csv_name(scores.split)
    write_text(g, global_csv_text(scores.global_metrics()))
    write_text(s, per_sequence_csv_text(scores))
    return g, s


def format_tables(scores: DavisScores) -> str:
    """The two tables evaluation_method.py prints."""
    g = scores.global_metrics()
    head = f"--------------------------- Global results for {scores.split} ---------------------------\n"
    table = " ".join(f"{c:>9}" for c in GLOBAL_COLUMNS) + "\n" + " ".join(f"{g[c]:9.6f}" for c in GLOBAL_COLUMNS)
    seq = f"\n\n---------- Per sequence results for {scores.split} ----------\n"
    rows = [f"{'Sequence':>24} {'J-Mean':>9} {'F-Mean':>9}"]
    rows += [f"{n:>24} {jm:9.6f} {fm:9.6f}" for n, jm, fm in zip(scores.objects, scores.j["M"], scores.f["M"])]
    return head + table + seq + "\n".join(rows) + "\n"
