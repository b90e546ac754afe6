"""Pascal VOC 2007 + 2012 detection layout (the VOCdevkit tars):

    VOCdevkit/VOC2007/JPEGImages/<6-digit id>.jpg
    VOCdevkit/VOC2007/Annotations/<id>.xml              (annotation/size/object[name, pose, truncated, difficult,
                                                         bndbox 1-based inclusive pixel corners])
    VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt
    VOCdevkit/VOC2012/{JPEGImages,Annotations}/<yyyy_6-digit id>.{jpg,xml}, ImageSets/Main/trainval.txt

The "train" count is split between VOC2007 trainval and VOC2012 trainval (the VOC07+12 protocol trains on both);
"val" images are VOC2007 test. The scene classes are named after the first VOC classes (``VOC_CLASSES``), so
mmdet's ``VOCDataset`` reads the files with its own 20-class table; one object in every fourth image is marked
``difficult`` (VOC's evaluation ignores those), as in the real annotations."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .scenes import NUM_THINGS, THING_CLASSES, Scene, polygon_bbox, render_scene, save_jpeg, scene_rng

DATASET_INDEX = 7
# Pascal VOC's 20 classes in the devkit's (alphabetical) order; mmdet VOCDataset.METAINFO has the same list.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
SCENE_NAMES: tuple[str, ...] = VOC_CLASSES[:NUM_THINGS]  # scene thing class k is written as VOC_CLASSES[k]
DIFFICULT_EVERY = 4


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    return render_scene(scene_rng(seed, DATASET_INDEX, split_index, index), *hw)


def _xml(folder: str, filename: str, scene: Scene, difficult_first: bool) -> bytes:
    h, w = scene.semantic.shape
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "densessl synthetic scenes in the Pascal VOC layout"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    marked = not difficult_first
    for i, thing in enumerate(scene.things):
        m = scene.visible(i)
        if not m.any():
            continue
        x, y, bw, bh = polygon_bbox(m)
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = SCENE_NAMES[thing.cls]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0" if marked else "1"
        marked = True
        box = ET.SubElement(obj, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices
        for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + bw), ("ymax", y + bh)):
            ET.SubElement(box, tag).text = str(int(value))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    devkit = root / "VOCdevkit"
    n07 = (counts["train"] + 1) // 2
    parts = [  # (year, image-set, split_index, number of images, id format)
        ("VOC2007", "trainval", 0, n07, "{:06d}"),
        ("VOC2012", "trainval", 1, counts["train"] - n07, "2012_{:06d}"),
        ("VOC2007", "test", 2, counts["val"], "{:06d}"),
    ]
    objects: dict[str, int] = {}
    offset = {"VOC2007": 0, "VOC2012": 0}
    for year, image_set, split_index, n, fmt in parts:
        base = devkit / year
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(n):
            scene = render(seed, split_index, i, hw)
            img_id = fmt.format(offset[year] + i + 1)
            ids.append(img_id)
            save_jpeg(base / "JPEGImages" / f"{img_id}.jpg", scene.image)
            doc = _xml(year, f"{img_id}.jpg", scene, difficult_first=i % DIFFICULT_EVERY == 1)
            (base / "Annotations" / f"{img_id}.xml").write_bytes(doc)
            if progress:
                progress(1)
        offset[year] += n
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{x}\n" for x in ids),
                                                                     encoding="utf-8")
        objects[f"{year}/{image_set}"] = n
    return {
        "layout": "Pascal VOC: VOCdevkit/VOC{2007,2012}/{JPEGImages,Annotations,ImageSets/Main}",
        "splits": {"train": counts["train"], "val": counts["val"]},
        "image_sets": objects,
        "image_hw": list(hw),
        "classes": {ours: voc for ours, voc in zip(THING_CLASSES, SCENE_NAMES)},
    }
