"""The data part of a generated mmdet config: where each dataset's files are, its pipelines, loaders, evaluator.

mmdet reads the real on-disk layouts through its own dataset classes (``CocoDataset``, ``LVISV1Dataset``,
``CityscapesDataset`` on the COCO-style files of mmdet's converter, ``VOCDataset``); this module only finds the
files in a dataset root and says in one line what is missing when the layout is not one mmdet can read. The
pipelines and evaluators are those of mmdet 3.3.0's ``configs/_base_/datasets/{coco_instance,lvis_v1_instance,
cityscapes_instance,voc0712}.py``, written out from our settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densessl.errors import DataError
from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig

CITYSCAPES_ANN = "instancesonly_filtered_gtFine_{split}.json"  # names used by mmdet's cityscapes converter docs


@dataclass(frozen=True)
class DatasetFiles:
    """Absolute paths of one dataset's train and test parts, as mmdet's dataset classes take them."""

    kind: str
    root: Path
    train: tuple[dict[str, Any], ...]     # one dict per training set (VOC: 2007 and 2012)
    test: dict[str, Any]
    classes: tuple[str, ...]
    seg_prefix: Path | None = None        # Cityscapes gtFine/val for cityscapesscripts


def _need(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: {what} not found; {fix}")
    return path


def _json_classes(ann_file: Path) -> tuple[str, ...]:
    try:
        doc = json.loads(ann_file.read_text(encoding="utf-8"))
        return tuple(c["name"] for c in doc["categories"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{ann_file}: not a COCO-style annotation file with 'categories' ({exc}); re-run the "
                        f"data stage or fetch the official file") from exc


def coco_files(root: Path) -> DatasetFiles:
    """COCO 2017: ``annotations/instances_{train,val}2017.json`` and images under ``{train,val}2017/`` (the
    official archive) or ``images/{train,val}2017/`` (the densessl data stage's layout)."""
    prefix = "images/" if (root / "images" / "val2017").is_dir() else ""
    parts = {}
    for split in ("train2017", "val2017"):
        ann = _need(root / "annotations" / f"instances_{split}.json", "COCO annotation file",
                    "data.roots.coco must hold annotations/instances_{train,val}2017.json")
        _need(root / prefix / split, "COCO image folder", f"data.roots.coco must hold {split}/ (or images/{split}/)")
        parts[split] = {"ann_file": str(ann), "data_prefix": {"img": str(root / prefix / split) + "/"}}
    return DatasetFiles("coco", root, (parts["train2017"],), parts["val2017"],
                        _json_classes(Path(parts["val2017"]["ann_file"])))


def lvis_files(root: Path) -> DatasetFiles:
    """LVIS v1: ``lvis_v1_{train,val}.json`` in ``annotations/`` (mmdet's ``data/lvis_v1``) or the root, on COCO
    2017 images whose paths are the ``coco_url`` tails (``train2017/<id>.jpg``), under the root or ``images/``."""
    parts = {}
    prefix = "images/" if (root / "images" / "val2017").is_dir() else ""
    for split in ("train", "val"):
        candidates = [root / "annotations" / f"lvis_v1_{split}.json", root / f"lvis_v1_{split}.json"]
        ann = next((p for p in candidates if p.is_file()), None)
        if ann is None:
            raise DataError(f"{root}: LVIS v1 annotation lvis_v1_{split}.json not found in annotations/ or the "
                            f"root; download it from the LVIS site and unzip it there")
        _need(root / prefix / f"{split}2017", "COCO 2017 image folder for LVIS",
              f"put (or link) the COCO {split}2017/ images into data.roots.lvis")
        parts[split] = {"ann_file": str(ann), "data_prefix": {"img": str(root / prefix)}}
    return DatasetFiles("lvis", root, (parts["train"],), parts["val"], _json_classes(Path(parts["val"]["ann_file"])))


def cityscapes_files(root: Path, converted: Path) -> DatasetFiles:
    """Cityscapes fine: ``leftImg8bit/{train,val}`` images, ``gtFine/val`` for cityscapesscripts, and the
    COCO-style instance files mmdet's ``CityscapesDataset`` reads (written by the data stage into ``converted``
    with cityscapesscripts' label table; a root that already has ``annotations/`` from mmdet's converter is
    used as it is)."""
    parts = {}
    for split in ("train", "val"):
        name = CITYSCAPES_ANN.format(split=split)
        ann = root / "annotations" / name
        if not ann.is_file():
            ann = _need(converted / name, "Cityscapes COCO-style instance file",
                        "re-run the data stage for cityscapes (it converts gtFine into these files)")
        img = _need(root / "leftImg8bit" / split, "Cityscapes image folder",
                    "data.roots.cityscapes must hold leftImg8bit/ and gtFine/ (the official packages)")
        parts[split] = {"ann_file": str(ann), "data_prefix": {"img": str(img) + "/"}}
    seg = _need(root / "gtFine" / "val", "Cityscapes gtFine/val", "unpack gtFine_trainvaltest into data.roots.cityscapes")
    return DatasetFiles("cityscapes", root, (parts["train"],), parts["val"],
                        _json_classes(Path(parts["val"]["ann_file"])), seg_prefix=seg)


def voc_files(root: Path) -> DatasetFiles:
    """Pascal VOC: ``VOCdevkit/VOC{2007,2012}/{JPEGImages,Annotations,ImageSets/Main}``; the root may be the
    VOCdevkit folder or its parent. Train = VOC2007 + VOC2012 trainval, test = VOC2007 test (PixPro
    ``Pascal_VOC_R_50_C4_24k.yaml``: voc_2007_trainval + voc_2012_trainval -> voc_2007_test)."""
    from densessl.data.synthetic.voc import VOC_CLASSES

    devkit = root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root
    train = []
    for year, split in (("VOC2007", "trainval"), ("VOC2012", "trainval")):
        ids = _need(devkit / year / "ImageSets" / "Main" / f"{split}.txt", f"{year} {split} list",
                    "data.roots.voc must hold VOCdevkit/VOC2007 and VOCdevkit/VOC2012 (the official tars)")
        train.append({"ann_file": str(ids), "data_prefix": {"sub_data_root": str(devkit / year) + "/"}})
    test_ids = _need(devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt", "VOC2007 test list",
                     "unpack VOCtest_06-Nov-2007.tar into data.roots.voc")
    test = {"ann_file": str(test_ids), "data_prefix": {"sub_data_root": str(devkit / "VOC2007") + "/"}}
    return DatasetFiles("voc", root, tuple(train), test, tuple(VOC_CLASSES))


def dataset_files(dataset: str, root: Path, converted: Path | None = None) -> DatasetFiles:
    if dataset == "coco":
        return coco_files(root)
    if dataset == "lvis":
        return lvis_files(root)
    if dataset == "cityscapes":
        return cityscapes_files(root, converted or root / "annotations")
    if dataset == "voc":
        return voc_files(root)
    raise DataError(f"dataset {dataset!r}: no mmdet layout for it (coco, lvis, cityscapes, voc)")


# ------------------------------------------------------------------ pipelines
def train_pipeline(cfg: DetectionConfig, mask: bool) -> list[dict[str, Any]]:
    scales = [(cfg.max_size, s) for s in cfg.train_scales]
    if cfg.detr_crop_policy:
        # DETR-style AutoAugment of the ViT recipe (SelfPatch/GTSA mmdet configs, Swin's recipe): either a
        # multi-scale resize, or resize 400/500/600 -> random crop 384..600 -> multi-scale resize
        resize: dict[str, Any] = {"type": "RandomChoice", "transforms": [
            [{"type": "RandomChoiceResize", "scales": scales, "keep_ratio": True}],
            [{"type": "RandomChoiceResize", "scales": [(cfg.max_size, s) for s in cfg.crop_scales],
              "keep_ratio": True},
             {"type": "RandomCrop", "crop_type": "absolute_range", "crop_size": tuple(cfg.crop_size_range),
              "allow_negative_crop": True},
             {"type": "RandomChoiceResize", "scales": scales, "keep_ratio": True}]]}
    elif cfg.multiscale_mode == "range":
        resize = {"type": "RandomResize", "scale": scales, "keep_ratio": True}
    elif len(scales) == 1:
        resize = {"type": "Resize", "scale": scales[0], "keep_ratio": True}
    else:
        resize = {"type": "RandomChoiceResize", "scales": scales, "keep_ratio": True}
    return [{"type": "LoadImageFromFile"}, {"type": "LoadAnnotations", "with_bbox": True, "with_mask": mask},
            resize, {"type": "RandomFlip", "prob": cfg.flip_prob}, {"type": "PackDetInputs"}]


def test_pipeline(cfg: DetectionConfig, mask: bool) -> list[dict[str, Any]]:
    return [{"type": "LoadImageFromFile"},
            {"type": "Resize", "scale": (cfg.max_size, cfg.test_scale), "keep_ratio": True},
            {"type": "LoadAnnotations", "with_bbox": True, "with_mask": mask},
            {"type": "PackDetInputs", "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")}]


_DATASET_TYPE = {"coco": "CocoDataset", "lvis": "LVISV1Dataset", "cityscapes": "CityscapesDataset", "voc": "VOCDataset"}


def _dataset(files: DatasetFiles, part: dict[str, Any], pipeline: list[dict[str, Any]], test: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"type": _DATASET_TYPE[files.kind], "data_root": str(files.root), **part,
                         "pipeline": pipeline}
    if files.kind in ("coco", "lvis"):  # class names from the file (the synthetic data has its own)
        d["metainfo"] = {"classes": files.classes}
    if test:
        d["test_mode"] = True
    else:
        d["filter_cfg"] = {"filter_empty_gt": True, "min_size": 32}
    return d


def dataloaders(files: DatasetFiles, cfg: DetectionConfig, mask: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    train_sets = [_dataset(files, part, train_pipeline(cfg, mask), test=False) for part in files.train]
    for d in train_sets:
        d["filter_cfg"]["min_size"] = cfg.filter_min_size
    train: dict[str, Any] = (train_sets[0] if len(train_sets) == 1 else
                             {"type": "ConcatDataset", "ignore_keys": ["dataset_type"], "datasets": train_sets})
    if cfg.oversample_thr is not None:
        train = {"type": "ClassBalancedDataset", "oversample_thr": cfg.oversample_thr, "dataset": train}
    if cfg.repeat_times > 1:
        train = {"type": "RepeatDataset", "times": cfg.repeat_times, "dataset": train}
    workers = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0}
    train_loader = {"batch_size": cfg.batch_size_per_gpu, **workers,
                    "sampler": {"type": "DefaultSampler" if cfg.by_epoch else "InfiniteSampler", "shuffle": True},
                    "batch_sampler": {"type": "AspectRatioBatchSampler"}, "dataset": train}
    test_loader = {"batch_size": 1, **workers, "drop_last": False,
                   "sampler": {"type": "DefaultSampler", "shuffle": False},
                   "dataset": _dataset(files, files.test, test_pipeline(cfg, mask), test=True)}
    return train_loader, test_loader


VOC_IOU_THRS = [round(0.5 + 0.05 * i, 2) for i in range(10)]


def evaluator(files: DatasetFiles, mask: bool, work_dir: Path) -> dict[str, Any] | list[dict[str, Any]]:
    """The kept evaluators: pycocotools (CocoMetric), the lvis API (LVISMetric), cityscapesscripts
    (CityScapesMetric) and mmdet's VOC mAP (VOCMetric, VOC2007's 11-point AP as detectron2's Pascal VOC
    evaluator, averaged over IoU 0.50:0.05:0.95 for AP as detectron2 prints it)."""
    metric = ["bbox", "segm"] if mask else ["bbox"]
    test_ann = files.test["ann_file"]
    if files.kind == "coco":
        return {"type": "CocoMetric", "ann_file": test_ann, "metric": metric, "format_only": False}
    if files.kind == "lvis":
        return {"type": "LVISMetric", "ann_file": test_ann, "metric": metric}
    if files.kind == "cityscapes":
        return [{"type": "CocoMetric", "ann_file": test_ann, "metric": metric},
                {"type": "CityScapesMetric", "seg_prefix": str(files.seg_prefix),
                 "outfile_prefix": str(work_dir / "cityscapes_metric")}]
    return {"type": "VOCMetric", "metric": "mAP", "eval_mode": "11points", "iou_thrs": VOC_IOU_THRS}
