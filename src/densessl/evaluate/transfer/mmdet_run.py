"""Run one mmdetection protocol on one exported backbone: export, generate the config, train and test through
mmdet's runner (``mmengine_run.train_and_test``), and name the kept evaluator's metrics as the papers' tables do.

Metric names follow ``report/paper_tables.yaml``: ``AP_bb``/``AP_bb50``/``AP_bb75`` (box) and
``AP_mk``/``AP_mk50``/``AP_mk75`` (mask) in percent from pycocotools (CocoMetric) or the lvis API (LVISMetric, plus
``APr``/``APc``/``APf`` of the mask AP as LVIS reports it, and the box ones as ``AP_bb_r`` ...), Cityscapes ``AP`` /
``AP50`` from cityscapesscripts (CityScapesMetric), VOC ``AP`` (mean over IoU 0.50:0.05:0.95) / ``AP50`` / ``AP75``
from mmdet's VOCMetric. The toolkit's own keys are kept under ``toolkit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from densessl.checkpoints.io import sidecar_path
from densessl.data.manifest import data_root
from densessl.errors import ConfigError
from densessl.evaluate.transfer.mmdet_backbone import backbone_spec
from densessl.evaluate.transfer.mmdet_config import build_config
from densessl.evaluate.transfer.mmdet_data_cfg import dataset_files
from densessl.evaluate.transfer.mmdet_export import export_mmdet
from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig, protocol_info
from densessl.evaluate.transfer.mmdet_test_subset import limit_test_split
from densessl.io import read_json

EXPORT_NAME = "backbone_mmdet.safetensors"

_COCO = {"mAP": "", "mAP_50": "50", "mAP_75": "75", "mAP_s": "_s", "mAP_m": "_m", "mAP_l": "_l"}
_LVIS = {"AP": "", "AP50": "50", "AP75": "75", "APs": "_s", "APm": "_m", "APl": "_l", "APr": "_r", "APc": "_c",
         "APf": "_f"}
_KIND = {"bbox": "AP_bb", "segm": "AP_mk"}


def _percent(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return 100.0 * v if v >= 0 else None  # pycocotools writes -1 where a category/area has no ground truth


def detection_metrics(evaluator: str, raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        prefix, _, name = key.partition("/")
        kind, _, stat = name.partition("_")
        if prefix == "coco" and kind in _KIND and stat in _COCO:
            out[_KIND[kind] + _COCO[stat]] = _percent(value)
        elif prefix == "lvis" and kind in _KIND and stat in _LVIS:
            out[_KIND[kind] + _LVIS[stat]] = _percent(value)
        elif prefix == "cityscapes" and name in ("mAP", "AP@50"):
            out["AP" if name == "mAP" else "AP50"] = _percent(value)
        elif prefix == "pascal_voc" and name in ("mAP", "AP50", "AP75"):
            out["AP" if name == "mAP" else name] = _percent(value)
    if evaluator == "lvis":
        for band in ("r", "c", "f"):
            if f"AP_mk_{band}" in out:
                out[f"AP{band}"] = out[f"AP_mk_{band}"]
    needed = {"coco": "AP_bb", "lvis": "AP_bb", "cityscapes": "AP", "voc": "AP"}[evaluator]
    if needed not in out:
        raise ConfigError(f"the {evaluator} evaluator returned no {needed} (toolkit metrics: {sorted(raw)}); mmdet "
                          f"computes none when the detector keeps no detection above test score_thr on the whole "
                          f"test set: see the toolkit log in the mmdet work folder")
    out["toolkit"] = dict(raw)
    return out


def lvis_numpy_compat() -> None:
    """The ``lvis`` API (0.5.3, the newest on PyPI; mmdet's ``mmlvis`` fork likewise) calls ``np.float``, an alias
    numpy removed in 1.24; numpy defined it as exactly the builtin ``float``. Restoring that alias lets the kept
    evaluator run unchanged on the locked numpy 2."""
    import numpy as np

    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


def cityscapes_numpy_compat() -> None:
    """cityscapesscripts 2.3.0 (the newest on PyPI), whose instance evaluator mmdet's CityScapesMetric calls,
    uses ``np.in1d``, which numpy 2.4 removed in favour of ``np.isin``; numpy defined ``in1d(a, b)`` as
    ``isin(a, b).ravel()``. Restoring that definition lets the kept evaluator run unchanged."""
    import numpy as np

    if "in1d" not in np.__dict__:
        def in1d(ar1, ar2, assume_unique=False, invert=False):  # noqa: ANN001, ANN202 (numpy's signature)
            return np.isin(ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()

        np.in1d = in1d  # type: ignore[attr-defined]


def run_detection(protocol: str, backbone_path: Path, manifest: Path, cfg: DetectionConfig, work_dir: Path,
                  device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Train and evaluate ``protocol`` on the backbone at ``backbone_path``; the toolkit's files (log, resolved
    config, checkpoints for resuming) go to ``work_dir``."""
    from densessl.evaluate.transfer import mmengine_run

    info = protocol_info(protocol)
    if not Path(backbone_path).is_file():
        raise ConfigError(f"{backbone_path}: backbone checkpoint not found; run the pretrain/convert stage first")
    meta = read_json(sidecar_path(backbone_path))
    spec = backbone_spec(meta["arch"], meta.get("arch_kwargs", {}))
    if spec.family not in info["backbones"]:
        raise ConfigError(f"evaluate {protocol}: the protocol takes {' and '.join(info['backbones'])} backbones, "
                          f"and {backbone_path} is a {meta['arch']}")
    procs = mmengine_run.world_size()
    if procs != cfg.gpus:
        raise ConfigError(f"evaluate.{protocol}.gpus is {cfg.gpus} (total batch {cfg.total_batch} at lr {cfg.lr}) "
                          f"but this run has {procs} process(es); launch {cfg.gpus} processes or set gpus (and lr) "
                          f"for the batch you run")
    files = dataset_files(info["dataset"], Path(data_root(manifest)).resolve(), converted=(Path(manifest).parent / "annotations").resolve())
    work_dir.mkdir(parents=True, exist_ok=True)
    files = limit_test_split(files, cfg.max_test_images, work_dir)
    exported = export_mmdet(backbone_path, work_dir / EXPORT_NAME, spec.family, info["detector"])
    config = build_config(protocol, spec, files, cfg, work_dir, exported)
    mmengine_run.require_mmcv_ops()
    mmengine_run.require("mmdet", "mmdet")
    import densessl.evaluate.transfer.mmdet_modules  # noqa: F401  (registers the densessl modules in mmdet)

    if info["evaluator"] == "lvis":
        lvis_numpy_compat()
    if info["evaluator"] == "cityscapes":
        cityscapes_numpy_compat()

    raw = mmengine_run.train_and_test(config, mmengine_run.ToolkitRun(work_dir=work_dir, scope="mmdet",
                                                                      seed=cfg.seed, threads=threads,
                                                                      device=device))
    return detection_metrics(info["evaluator"], raw)
