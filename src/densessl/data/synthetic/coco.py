"""COCO 2017 layout with COCO-Stuff pixel maps:

    images/{train2017,val2017}/<12-digit id>.jpg
    annotations/instances_{train2017,val2017}.json   (full COCO schema; polygons, RLE for iscrowd=1)
    annotations/{train2017,val2017}/<12-digit id>.png (COCO-Stuff ids: thing = category_id - 1, stuff 91..181,
                                                      255 = unlabelled; the layout Patch-Seg reads)
    annotations/person_keypoints_{train2017,val2017}.json (COCO keypoints of category 1, coco_keypoints.py)

Category ids are non-contiguous like real COCO. Polygons trace the visible (occlusion-aware) mask's pixel
boundary exactly, so ``COCO.annToMask`` gives back the rasterised instance."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .coco_keypoints import person_annotations, person_category
from .scenes import (
    NUM_THINGS,
    STUFF_CLASSES,
    THING_CLASSES,
    UNLABELLED,
    Scene,
    mask_to_polygons,
    polygon_bbox,
    render_scene,
    save_jpeg,
    save_png,
    scene_rng,
)

DATASET_INDEX = 1
SPLITS = {"train": "train2017", "val": "val2017"}
# COCO category ids of the thing classes (gaps at 3-10, 12, 14-24, 26, 28-43, 45 as in real COCO numbering).
THING_CATEGORY_IDS: tuple[int, ...] = (1, 2, 11, 13, 25, 27, 44, 46)
# COCO-Stuff map values (0-based) of the stuff classes: sky-other, grass, wall-brick, sea.
STUFF_MAP_IDS: tuple[int, ...] = (156, 123, 170, 154)
CROWD_EVERY = 4  # image index % CROWD_EVERY == 1: its bottom-most visible thing is a crowd (RLE) annotation

INFO = {
    "description": "densessl synthetic scenes in the COCO 2017 layout",
    "url": "",
    "version": "1.0",
    "year": 2017,
    "contributor": "densessl",
    "date_created": "2017/09/01",
}
LICENSES = [{"url": "", "id": 1, "name": "synthetic, no rights reserved"}]


def stuffmap_lut() -> np.ndarray:
    """Internal semantic id -> COCO-Stuff map value."""
    lut = np.full(256, 255, np.uint8)
    lut[:NUM_THINGS] = np.array(THING_CATEGORY_IDS) - 1
    lut[NUM_THINGS : NUM_THINGS + len(STUFF_MAP_IDS)] = STUFF_MAP_IDS
    lut[UNLABELLED] = 255
    return lut


def image_id(split_index: int, index: int) -> int:
    return 100000 * (split_index + 1) + 3 * index + 7


def categories() -> list[dict[str, Any]]:
    return [
        {"supercategory": "shape", "id": cid, "name": name}
        for cid, name in zip(THING_CATEGORY_IDS, THING_CLASSES)
    ]


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    return render_scene(scene_rng(seed, DATASET_INDEX, split_index, index), *hw)


def instance_annotations(
    scene: Scene,
    img_id: int,
    first_ann_id: int,
    category_ids: tuple[int, ...],
    crowd: bool,
    polygons_only: bool,
) -> list[dict[str, Any]]:
    """COCO annotations of a scene's visible things (paint order)."""
    anns = []
    crowd_done = not crowd
    for i, thing in enumerate(scene.things):
        m = scene.visible(i)
        if not m.any():
            continue
        ann: dict[str, Any] = {"id": first_ann_id + len(anns), "image_id": img_id}
        if not crowd_done and not polygons_only:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ann["segmentation"] = {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            }
            iscrowd = 1
            crowd_done = True
        else:
            ann["segmentation"] = mask_to_polygons(m)
            iscrowd = 0
        ann.update(
            {
                "area": float(m.sum()),
                "bbox": polygon_bbox(m),
                "category_id": category_ids[thing.cls],
            }
        )
        if not polygons_only:
            ann["iscrowd"] = iscrowd
        anns.append(ann)
    return anns


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    h, w = hw
    lut = stuffmap_lut()
    n_instances, n_persons = {}, {}
    for split_index, (split, folder) in enumerate(SPLITS.items()):
        img_dir = root / "images" / folder
        map_dir = root / "annotations" / folder
        img_dir.mkdir(parents=True)
        map_dir.mkdir(parents=True)
        images, anns, persons = [], [], []
        for i in range(counts[split]):
            scene = render(seed, split_index, i, hw)
            img_id = image_id(split_index, i)
            stem = f"{img_id:012d}"
            save_jpeg(img_dir / f"{stem}.jpg", scene.image)
            save_png(map_dir / f"{stem}.png", Image.fromarray(lut[scene.semantic], "L"))
            images.append(
                {
                    "license": 1,
                    "file_name": f"{stem}.jpg",
                    "coco_url": f"http://images.cocodataset.org/{folder}/{stem}.jpg",
                    "height": h,
                    "width": w,
                    "date_captured": "2013-11-14 16:28:13",
                    "flickr_url": "",
                    "id": img_id,
                }
            )
            crowd = i % CROWD_EVERY == 1
            new = instance_annotations(
                scene,
                img_id,
                len(anns) + 1 + 10**6 * split_index,
                THING_CATEGORY_IDS,
                crowd,
                polygons_only=False,
            )
            anns += new
            persons += person_annotations(scene, new)
            if progress:
                progress(1)
        n_instances[split] = len(anns)
        doc = {
            "info": INFO,
            "licenses": LICENSES,
            "images": images,
            "annotations": anns,
            "categories": categories(),
        }
        write_json(root / "annotations" / f"instances_{folder}.json", doc)
        n_persons[split] = len(persons)
        # the real keypoint files list every image of the split and annotate only persons
        write_json(root / "annotations" / f"person_keypoints_{folder}.json",
                   {**doc, "annotations": persons, "categories": [person_category()]})
    return {
        "layout": "COCO 2017: images/{train2017,val2017}/*.jpg, annotations/instances_*.json, "
        "COCO-Stuff maps annotations/{train2017,val2017}/*.png, annotations/person_keypoints_*.json",
        "splits": {split: counts[split] for split in SPLITS},
        "split_names": dict(SPLITS),
        "instances": n_instances,
        "person_keypoint_instances": n_persons,
        "image_hw": list(hw),
        "classes": {
            "things": {name: cid for name, cid in zip(THING_CLASSES, THING_CATEGORY_IDS)},
            "stuffthingmap_things": {name: cid - 1 for name, cid in zip(THING_CLASSES, THING_CATEGORY_IDS)},
            "stuffthingmap_stuff": dict(zip(STUFF_CLASSES, STUFF_MAP_IDS)),
            "stuffthingmap_unlabelled": 255,
        },
    }


def write_json(path: Path, doc: Any) -> None:
    """Compact, key-order-preserving JSON (like the real annotation files)."""
    path.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
