"""Cityscapes (fine) layout:

    leftImg8bit/{train,val}/<city>/<city>_<6 digits>_<6 digits>_leftImg8bit.png
    gtFine/{train,val}/<city>/<stem>_gtFine_{labelIds,instanceIds,color}.png and <stem>_gtFine_polygons.json

labelIds use the real Cityscapes ids (0 = unlabeled); instanceIds = labelId * 1000 + instance number for the 8
instance classes and = labelId elsewhere (16-bit PNG); color uses the real label colours (RGBA). Polygons list
stuff regions then things (full, unoccluded outlines) in drawing order, as in the real files."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .coco import write_json
from .scenes import (
    STUFF_CLASSES,
    THING_CLASSES,
    Scene,
    mask_to_polygons,
    render_scene,
    save_png,
    scene_rng,
)

DATASET_INDEX = 6
CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau")}
# (name, labelId, colour) of the classes we use, in our thing / stuff order.
THING_LABELS: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
STUFF_LABELS: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("sky", 23, (70, 130, 180)),
    ("vegetation", 21, (107, 142, 35)),
    ("building", 11, (70, 70, 70)),
    ("road", 7, (128, 64, 128)),
)
UNLABELED_ID = 0


def luts() -> tuple[np.ndarray, np.ndarray]:
    """Internal semantic id -> (labelId, RGB colour)."""
    label = np.zeros(256, np.uint8)
    color = np.zeros((256, 3), np.uint8)
    for k, (_, lid, col) in enumerate(THING_LABELS + STUFF_LABELS):
        label[k] = lid
        color[k] = col
    return label, color


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    return render_scene(scene_rng(seed, DATASET_INDEX, split_index, index), *hw)


def stem(split: str, index: int) -> tuple[str, str]:
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_000019"


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    h, w = hw
    label_lut, color_lut = luts()
    names = [n for n, _, _ in THING_LABELS + STUFF_LABELS]
    for split_index, split in enumerate(("train", "val")):
        for i in range(counts[split]):
            scene = render(seed, split_index, i, hw)
            city, name = stem(split, i)
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            save_png(img_dir / f"{name}_leftImg8bit.png", Image.fromarray(scene.image, "RGB"))
            label_ids = label_lut[scene.semantic]
            instance_ids = label_ids.astype(np.int32)
            per_class: dict[int, int] = {}
            for k, thing in enumerate(
                scene.things
            ):  # instance numbers count from 0 per class, as in the real data
                m = scene.visible(k)
                if m.any():
                    number = per_class.setdefault(thing.cls, 0)
                    per_class[thing.cls] = number + 1
                    instance_ids[m] = int(label_lut[thing.cls]) * 1000 + number
            rgba = np.concatenate([color_lut[scene.semantic], np.full((h, w, 1), 255, np.uint8)], axis=-1)
            save_png(gt_dir / f"{name}_gtFine_labelIds.png", Image.fromarray(label_ids, "L"))
            save_png(gt_dir / f"{name}_gtFine_instanceIds.png", _uint16_image(instance_ids))
            save_png(gt_dir / f"{name}_gtFine_color.png", Image.fromarray(rgba, "RGBA"))
            write_json(gt_dir / f"{name}_gtFine_polygons.json", polygons_doc(scene, names))
            if progress:
                progress(1)
    return {
        "layout": "Cityscapes: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/{train,val}/<city>/*_gtFine_*",
        "splits": {split: counts[split] for split in ("train", "val")},
        "image_hw": list(hw),
        "classes": {
            "things": {our: lid for our, (_, lid, _) in zip(THING_CLASSES, THING_LABELS)},
            "thing_names": {our: name for our, (name, _, _) in zip(THING_CLASSES, THING_LABELS)},
            "stuff": {our: lid for our, (_, lid, _) in zip(STUFF_CLASSES, STUFF_LABELS)},
            "stuff_names": {our: name for our, (name, _, _) in zip(STUFF_CLASSES, STUFF_LABELS)},
            "unlabeled": UNLABELED_ID,
        },
    }


def polygons_doc(scene: Scene, names: list[str]) -> dict[str, Any]:
    h, w = scene.semantic.shape
    objects = []
    for k, cls in enumerate(scene.region_classes):
        for poly in mask_to_polygons(scene.regions == k):
            objects.append({"label": names[cls], "polygon": _points(poly)})
    for t in scene.things:
        assert t.amodal is not None
        for poly in mask_to_polygons(t.amodal):
            objects.append({"label": names[t.cls], "polygon": _points(poly)})
    return {"imgHeight": h, "imgWidth": w, "objects": objects}


def _points(flat: list[float]) -> list[list[int]]:
    return [[int(flat[i]), int(flat[i + 1])] for i in range(0, len(flat), 2)]


def _uint16_image(a: np.ndarray) -> Image.Image:
    assert a.min() >= 0 and a.max() < 65536
    return Image.fromarray(a.astype(np.uint16))
