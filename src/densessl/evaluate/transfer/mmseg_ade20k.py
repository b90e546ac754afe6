"""ADE20K semantic segmentation through mmsegmentation: ``semfpn_ade20k`` and ``upernet_ade20k``.

The backbone is exported into mmseg's ViT layout (``mmseg_export``), the toolkit config is generated from the
settings (``mmseg_config``), and mmseg's own runner trains and tests it (``mmengine_run``). Metrics come from
mmseg's ``IoUMetric`` reading the ADEChallengeData2016 folders with mmseg's ``ADE20KDataset``
(``reduce_zero_label=True``): aAcc, mIoU, mAcc as mmseg reports them (percent), plus the per-class IoU that
``IoUMetric`` prints but does not return, taken from the same accumulated areas by mmseg's own
``total_area_to_metrics``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from densessl.data.ade20k import resolve_ade_root
from densessl.errors import ConfigError, DataError
from densessl.evaluate.transfer.mmengine_run import (
    ToolkitRun,
    require,
    require_mmcv_ops,
    safetensors_uri,
    train_and_test,
    world_size,
)
from densessl.evaluate.transfer.mmseg_config import MMSegSettings, build_mmseg_config
from densessl.evaluate.transfer.mmseg_export import export_mmseg_vit
from densessl.models.backbones import backbone_info

EXPORT_NAME = "backbone_mmseg_vit.safetensors"


def register_metric() -> None:
    """``DensesslIoUMetric``: mmseg's ``IoUMetric`` that also returns the per-class IoU (percent, None where a
    class has no pixels in either prediction or ground truth, which mmseg prints as nan)."""
    require("mmseg", "mmsegmentation")
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import METRICS

    if "DensesslIoUMetric" in METRICS.module_dict:
        return

    @METRICS.register_module(name="DensesslIoUMetric")
    class DensesslIoUMetric(IoUMetric):
        def compute_metrics(self, results: list) -> dict[str, Any]:
            summary = super().compute_metrics(results)
            areas = [sum(column) for column in zip(*results)]  # intersect, union, pred, label (as mmseg)
            per_class = self.total_area_to_metrics(*areas, ["mIoU"], self.nan_to_num, self.beta)["IoU"]
            names = self.dataset_meta["classes"]
            summary["per_class_IoU"] = {
                name: (None if math.isnan(float(v)) else round(float(v) * 100, 2)) for name, v in zip(names, per_class)}
            return summary


def check_layout(root: Path) -> Path:
    """The ADEChallengeData2016 folder mmseg's ADE20KDataset reads, or one line saying what is missing."""
    base = resolve_ade_root(root)
    for split in ("training", "validation"):
        images, labels = base / "images" / split, base / "annotations" / split
        if not any(images.glob("*.jpg")) or not any(labels.glob("*.png")):
            raise DataError(f"{base}: mmseg's ADE20KDataset reads images/{split}/*.jpg and annotations/{split}/*.png, "
                            f"and {images if not any(images.glob('*.jpg')) else labels} has none; point the "
                            f"ADE20K root at the ADEChallengeData2016 release")
    return base


def run_mmseg_ade20k(backbone: nn.Module, data_root: Path, cfg: MMSegSettings, out_dir: Path | None = None,
                     device: str | None = None, *, work_dir: Path) -> dict[str, Any]:
    """Train the configured decoder on ``backbone`` and return mmseg's test metrics on the validation split."""
    cfg.validate()
    base = check_layout(data_root)
    require_mmcv_ops()
    require("mmseg", "mmsegmentation")
    register_metric()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    weights = work_dir / EXPORT_NAME
    spec, exported = export_mmseg_vit(backbone, weights, cfg.final_norm)
    info = backbone_info(backbone)
    toolkit_cfg = build_mmseg_config(spec, cfg, base, safetensors_uri(weights), info.mean, info.std,
                                     world_size=world_size())
    metrics = train_and_test(toolkit_cfg, ToolkitRun(work_dir=work_dir, scope="mmseg", seed=cfg.seed,
                                                     device=device, deterministic=cfg.deterministic))
    if "mIoU" not in metrics:
        raise ConfigError(f"mmseg's evaluator returned {sorted(metrics)} without mIoU")
    metrics["export"] = {"dropped_keys": exported.dropped, "with_cls_token": spec.class_token,
                         "out_indices": list(spec.out_indices())}
    return metrics
