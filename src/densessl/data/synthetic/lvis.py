"""LVIS v1 layout: ``lvis_v1_train.json`` and ``lvis_v1_val.json`` on COCO-style images (``train2017/``,
``val2017/``; an image's file is the basename of its ``coco_url``). Categories carry ``synset``, ``synonyms``,
``def``, ``frequency`` ('f' / 'c' / 'r'), ``image_count`` and ``instance_count``; images carry
``neg_category_ids`` and ``not_exhaustive_category_ids``; segmentations are polygons. Classes are drawn from a
long-tailed distribution, like LVIS; frequency groups are assigned by train image count (top 3 'f', next 3 'c',
last 2 'r')."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .coco import instance_annotations, write_json
from .scenes import NUM_THINGS, THING_CLASSES, Scene, render_scene, save_jpeg, scene_rng

DATASET_INDEX = 5
SPLITS = {"train": "train2017", "val": "val2017"}
CATEGORY_IDS: tuple[int, ...] = tuple(range(1, NUM_THINGS + 1))  # LVIS ids are contiguous from 1
CLASS_WEIGHTS = 0.65 ** np.arange(NUM_THINGS)


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    return render_scene(scene_rng(seed, DATASET_INDEX, split_index, index), *hw, class_weights=CLASS_WEIGHTS)


def image_id(split_index: int, index: int) -> int:
    return 200000 * (split_index + 1) + 5 * index + 3


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    h, w = hw
    docs = {}
    for split_index, (split, folder) in enumerate(SPLITS.items()):
        (root / folder).mkdir(parents=True)
        images, anns = [], []
        for i in range(counts[split]):
            scene = render(seed, split_index, i, hw)
            img_id = image_id(split_index, i)
            stem = f"{img_id:012d}"
            save_jpeg(root / folder / f"{stem}.jpg", scene.image)
            new = instance_annotations(
                scene,
                img_id,
                len(anns) + 1 + 10**6 * split_index,
                CATEGORY_IDS,
                crowd=False,
                polygons_only=True,
            )
            present = sorted({a["category_id"] for a in new})
            absent = [c for c in CATEGORY_IDS if c not in present]
            rng = np.random.default_rng([seed, DATASET_INDEX, split_index, i, 1])
            neg = sorted(int(c) for c in absent if rng.random() < 0.5)
            not_exhaustive = sorted(int(c) for c in present if rng.random() < 0.1)
            images.append(
                {
                    "id": img_id,
                    "coco_url": f"http://images.cocodataset.org/{folder}/{stem}.jpg",
                    "height": h,
                    "width": w,
                    "flickr_url": "",
                    "license": 1,
                    "date_captured": "2013-11-14 16:28:13",
                    "neg_category_ids": neg,
                    "not_exhaustive_category_ids": not_exhaustive,
                }
            )
            anns += new
            if progress:
                progress(1)
        docs[split] = (images, anns)
    cats = categories(docs["train"][1])
    for split, (images, anns) in docs.items():
        doc = {
            "info": {
                "description": "densessl synthetic LVIS v1 layout",
                "version": "1.0",
                "year": 2019,
                "contributor": "densessl",
                "url": "",
                "date_created": "2019-08-01",
            },
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
            "images": images,
            "annotations": anns,
            "categories": cats,
        }
        write_json(root / f"lvis_v1_{split}.json", doc)
    return {
        "layout": "LVIS v1: lvis_v1_{train,val}.json, images in train2017/, val2017/ (basename of coco_url)",
        "splits": {split: counts[split] for split in SPLITS},
        "instances": {split: len(d[1]) for split, d in docs.items()},
        "image_hw": list(hw),
        "classes": {c["name"]: {"id": c["id"], "frequency": c["frequency"]} for c in cats},
    }


def categories(train_anns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    image_count = {c: len({a["image_id"] for a in train_anns if a["category_id"] == c}) for c in CATEGORY_IDS}
    instance_count = {c: sum(a["category_id"] == c for a in train_anns) for c in CATEGORY_IDS}
    rank = sorted(CATEGORY_IDS, key=lambda c: (-image_count[c], c))
    freq = {c: "f" if r < 3 else ("c" if r < 6 else "r") for r, c in enumerate(rank)}
    out = []
    for cid, name in zip(CATEGORY_IDS, THING_CLASSES):
        shape, texture = name.split("-")
        out.append(
            {
                "id": cid,
                "name": name.replace("-", "_"),
                "synset": f"{shape}.n.01",
                "synonyms": [name.replace("-", "_"), shape],
                "def": f"a {shape} filled with a {texture} pattern",
                "frequency": freq[cid],
                "image_count": image_count[cid],
                "instance_count": instance_count[cid],
            }
        )
    return out
