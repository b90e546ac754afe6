"""Cityscapes fine instance annotations → the COCO-style files mmdet's ``CityscapesDataset`` reads.

mmdet does not read ``gtFine`` directly: its ``tools/dataset_converters/cityscapes.py`` (mmdet 3.3.0) turns every
``*_gtFine_instanceIds.png`` into RLE instances of the classes that have instances and are evaluated
(cityscapesscripts' label table), ids >= 1000 being single instances (label = id // 1000) and ids < 1000 crowd
regions. The data stage does the same here, with the same label table and the same image/annotation fields, so the
DAG prepares the files instead of asking the user to run the toolkit's script.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from densessl.errors import DataError
from densessl.io import write_text

SUFFIX = "leftImg8bit.png"


def _labels() -> Any:
    try:
        import cityscapesscripts.helpers.labels as labels
    except ImportError as exc:
        raise DataError("cityscapes: the cityscapesscripts package is missing; install the locked environment "
                        "(pip install cityscapesscripts)") from exc
    return labels


def categories() -> list[dict[str, Any]]:
    labels = _labels()
    return [{"id": lab.id, "name": lab.name} for lab in labels.labels if lab.hasInstances and not lab.ignoreInEval]


def image_record(img_file: Path, img_dir: Path, gt_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    labels = _labels()
    rel = img_file.relative_to(img_dir).as_posix()
    inst_file = gt_dir / (rel[: -len(SUFFIX)] + "gtFine_instanceIds.png")
    if not inst_file.is_file():
        raise DataError(f"{inst_file}: instance ids missing for {img_file}; unpack gtFine_trainvaltest next to "
                        f"leftImg8bit")
    inst = np.asarray(Image.open(inst_file))
    anns = []
    for inst_id in np.unique(inst[inst >= 24]):  # ids below 24 are stuff labels
        label_id = int(inst_id // 1000) if inst_id >= 1000 else int(inst_id)
        label = labels.id2label[label_id]
        if not label.hasInstances or label.ignoreInEval:
            continue
        rle = mask_utils.encode(np.asfortranarray((inst == inst_id).astype(np.uint8)))
        anns.append({"iscrowd": int(inst_id < 1000), "category_id": label.id,
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
                     "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}})
    record = {"file_name": rel, "height": int(inst.shape[0]), "width": int(inst.shape[1]),
              "segm_file": rel[: -len(SUFFIX)] + "gtFine_labelIds.png"}
    return record, anns


def convert_split(root: Path, split: str, out: Path) -> dict[str, int]:
    """Write ``out`` (COCO-style JSON) for ``root/leftImg8bit/<split>``; returns image / instance counts."""
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    files = sorted(img_dir.glob(f"*/*{SUFFIX}"))
    if not files:
        raise DataError(f"{img_dir}: no *_{SUFFIX} images; data.roots.cityscapes must hold leftImg8bit/{split}/<city>/")
    doc: dict[str, Any] = {"images": [], "annotations": [], "categories": categories()}
    for img_id, f in enumerate(files):
        record, anns = image_record(f, img_dir, gt_dir)
        doc["images"].append({**record, "id": img_id})
        for a in anns:
            doc["annotations"].append({**a, "image_id": img_id, "id": len(doc["annotations"])})
    write_text(out, json.dumps(doc, separators=(",", ":")))
    return {"images": len(doc["images"]), "instances": len(doc["annotations"])}


def convert(root: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Both splits, named as mmdet's Cityscapes config expects (``instancesonly_filtered_gtFine_<split>.json``)."""
    from densessl.evaluate.transfer.mmdet_data_cfg import CITYSCAPES_ANN

    return {split: convert_split(root, split, out_dir / CITYSCAPES_ANN.format(split=split))
            for split in ("train", "val")}
