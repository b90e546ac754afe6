"""The first N images of a detection test split, as annotation files of the same format beside the run.

Why a file and not mmengine's ``indices``: mmdet's ``CocoMetric`` and ``LVISMetric`` score every image of the
annotation file they read (``img_ids = get_img_ids()``), so testing on fewer images than the file lists would
count the others as missed. A subset file gives the dataset and its evaluator the same images. Used by the smoke
preset (``max_test_images``), whose detectors spend more CPU on testing the synthetic 200 images than on
training; the paper preset tests on the whole split.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from densessl.errors import DataError
from densessl.evaluate.transfer.mmdet_data_cfg import DatasetFiles
from densessl.io import write_json, write_text


def _coco_subset(ann_file: Path, max_images: int) -> dict:
    try:
        doc = json.loads(ann_file.read_text(encoding="utf-8"))
        images = sorted(doc["images"], key=lambda im: im["id"])[:max_images]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{ann_file}: not a COCO-style annotation file with 'images' ({exc}); re-run the data "
                        f"stage or fetch the official file") from exc
    keep = {im["id"] for im in images}
    return {**doc, "images": images, "annotations": [a for a in doc.get("annotations", []) if a["image_id"] in keep]}


def limit_test_split(files: DatasetFiles, max_images: int | None, work_dir: Path) -> DatasetFiles:
    """``files`` with its test part cut to the first ``max_images`` images (``None``: unchanged)."""
    if max_images is None:
        return files
    source = Path(files.test["ann_file"])
    # absolute: the toolkits join a relative ann_file onto the dataset's data_root
    work_dir = Path(work_dir).resolve()
    if files.kind == "voc":  # an image-id list, one a line (ImageSets/Main/test.txt)
        ids = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        target = work_dir / f"test_first{max_images}.txt"
        write_text(target, "\n".join(ids[:max_images]) + "\n")
    else:
        target = work_dir / f"test_first{max_images}.json"
        write_json(target, _coco_subset(source, max_images))
    return dataclasses.replace(files, test={**files.test, "ann_file": str(target)})
