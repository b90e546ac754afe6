"""The synthetic Pascal VOC layout: devkit folders, image-set lists, VOC XML with 1-based inclusive boxes."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from densessl.data.synthetic import synthesize
from densessl.data.synthetic.voc import SCENE_NAMES, VOC_CLASSES, render


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_voc_layout_lists_and_boxes(tmp_path):
    summary = synthesize("voc", tmp_path / "voc", "tiny", 0)
    devkit = tmp_path / "voc" / "VOCdevkit"
    lists = {f"{y}/{s}": (devkit / y / "ImageSets" / "Main" / f"{s}.txt").read_text().split()
             for y, s in (("VOC2007", "trainval"), ("VOC2012", "trainval"), ("VOC2007", "test"))}
    assert {k: len(v) for k, v in lists.items()} == summary["image_sets"] == \
        {"VOC2007/trainval": 4, "VOC2012/trainval": 4, "VOC2007/test": 4}
    assert not set(lists["VOC2007/trainval"]) & set(lists["VOC2007/test"])
    difficult = 0
    for i, img_id in enumerate(lists["VOC2007/test"]):
        assert (devkit / "VOC2007" / "JPEGImages" / f"{img_id}.jpg").is_file()
        root = ET.parse(devkit / "VOC2007" / "Annotations" / f"{img_id}.xml").getroot()
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        assert (w, h) == (96, 80)
        scene = render(0, 2, i, (80, 96))
        visible = [k for k in range(len(scene.things)) if scene.visible(k).any()]
        objects = root.findall("object")
        assert len(objects) == len(visible)
        for obj, k in zip(objects, visible):
            assert obj.find("name").text == SCENE_NAMES[scene.things[k].cls] and obj.find("name").text in VOC_CLASSES
            box = [int(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax")]
            ys, xs = np.nonzero(scene.visible(k))
            assert box == [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]  # 1-based, inclusive
            difficult += int(obj.find("difficult").text)
    assert difficult >= 1
    again = synthesize("voc", tmp_path / "copy", "tiny", 0)
    assert again["image_sets"] == summary["image_sets"]
    assert _digest(tmp_path / "voc" / "VOCdevkit") == _digest(tmp_path / "copy" / "VOCdevkit")
