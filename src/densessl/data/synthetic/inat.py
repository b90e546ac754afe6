"""iNaturalist 2019 layout: ``train2019.json`` and ``val2019.json`` (COCO-like: images, annotations,
categories with the taxonomy fields of the real file) and images at
``train_val2019/<supercategory folder>/<category_id>/<hash>.jpg`` (the ``file_name`` of each image). Every image
has one dominant thing (largest, in front) whose class is the label; classes are balanced."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .coco import write_json
from .scenes import NUM_THINGS, THING_CLASSES, Scene, render_scene, save_jpeg, scene_rng

DATASET_INDEX = 4
SPLITS = {"train": "train2019", "val": "val2019"}
IMAGE_DIR = "train_val2019"


def taxonomy(cid: int) -> dict[str, Any]:
    """Category entry shaped like the real file's (ids start at 0)."""
    shape, texture = THING_CLASSES[cid].split("-")
    plant = cid < NUM_THINGS // 2
    return {
        "id": cid,
        "name": f"{shape.capitalize()}us {texture}ii",
        "kingdom": "Plantae" if plant else "Animalia",
        "phylum": "Tracheophyta" if plant else "Arthropoda",
        "class": "Magnoliopsida" if plant else "Insecta",
        "order": f"{shape.capitalize()}ales",
        "family": f"{shape.capitalize()}aceae",
        "genus": f"{shape.capitalize()}us",
    }


def folder(cid: int) -> str:
    return "Plants" if cid < NUM_THINGS // 2 else "Insects"


def image_class(index: int) -> int:
    return index % NUM_THINGS


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    rng = scene_rng(seed, DATASET_INDEX, split_index, index)
    return render_scene(rng, *hw, main_class=image_class(index), max_things=2)


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    h, w = hw
    cats = [taxonomy(c) for c in range(NUM_THINGS)]
    next_id = 0
    for split_index, (split, json_name) in enumerate(SPLITS.items()):
        images, anns = [], []
        for i in range(counts[split]):
            scene = render(seed, split_index, i, hw)
            cid = image_class(i)
            digest = hashlib.md5(f"{seed}:{split}:{i}".encode()).hexdigest()
            file_name = f"{IMAGE_DIR}/{folder(cid)}/{cid}/{digest}.jpg"
            path = root / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            save_jpeg(path, scene.image)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name,
                    "rights_holder": "densessl",
                    "height": h,
                    "width": w,
                    "id": next_id,
                }
            )
            anns.append({"id": next_id, "image_id": next_id, "category_id": cid})
            next_id += 1
            if progress:
                progress(1)
        doc = {
            "info": {
                "year": 2019,
                "version": "1.0",
                "description": "densessl synthetic iNat 2019 layout",
                "contributor": "densessl",
                "url": "",
                "date_created": "2019-03-01",
            },
            "images": images,
            "categories": cats,
            "annotations": anns,
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
        }
        write_json(root / f"{json_name}.json", doc)
    return {
        "layout": "iNat 2019: train2019.json, val2019.json, train_val2019/<group>/<category_id>/<hash>.jpg",
        "splits": {split: counts[split] for split in SPLITS},
        "split_names": dict(SPLITS),
        "image_hw": list(hw),
        "classes": {c["name"]: c["id"] for c in cats},
    }
