"""ADE20K (ADEChallengeData2016) layout:

    ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_<8 digits>.png
    ADEChallengeData2016/objectInfo150.csv, ADEChallengeData2016/sceneCategories.txt

Annotations are single-channel uint8: 0 = other/unlabelled (stuff-region borders, clutter), 1..150 = class ids;
our classes use a subset of 1..150 (THING_IDS, STUFF_IDS)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .scenes import (
    NUM_THINGS,
    STUFF_CLASSES,
    THING_CLASSES,
    UNLABELLED,
    Scene,
    render_scene,
    save_jpeg,
    save_png,
    scene_rng,
)

DATASET_INDEX = 2
SPLITS = {"train": "training", "val": "validation"}
PREFIX = {"train": "ADE_train", "val": "ADE_val"}
THING_IDS: tuple[int, ...] = (13, 20, 21, 24, 37, 42, 68, 82)
STUFF_IDS: tuple[int, ...] = (3, 10, 1, 22)  # sky, grass, wall, water in the real numbering
NUM_CLASSES = 150


def label_lut() -> np.ndarray:
    """Internal semantic id -> ADE20K annotation value."""
    lut = np.zeros(256, np.uint8)
    lut[:NUM_THINGS] = THING_IDS
    lut[NUM_THINGS : NUM_THINGS + len(STUFF_IDS)] = STUFF_IDS
    lut[UNLABELLED] = 0
    return lut


def class_names() -> dict[int, str]:
    return {**dict(zip(THING_IDS, THING_CLASSES)), **dict(zip(STUFF_IDS, STUFF_CLASSES))}


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    return render_scene(scene_rng(seed, DATASET_INDEX, split_index, index), *hw)


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    base = root / "ADEChallengeData2016"
    lut = label_lut()
    scene_lines = []
    for split_index, (split, folder) in enumerate(SPLITS.items()):
        img_dir = base / "images" / folder
        ann_dir = base / "annotations" / folder
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for i in range(counts[split]):
            scene = render(seed, split_index, i, hw)
            stem = f"{PREFIX[split]}_{i + 1:08d}"
            save_jpeg(img_dir / f"{stem}.jpg", scene.image)
            save_png(ann_dir / f"{stem}.png", Image.fromarray(lut[scene.semantic], "L"))
            scene_lines.append(f"{stem} synthetic_scene\n")
            if progress:
                progress(1)
    names = class_names()
    rows = ["Idx,Ratio,Train,Val,Name\n"]
    rows += [f"{k},0,0,0,{names.get(k, f'unused{k}')}\n" for k in range(1, NUM_CLASSES + 1)]
    (base / "objectInfo150.csv").write_text("".join(rows), encoding="utf-8")
    (base / "sceneCategories.txt").write_text("".join(scene_lines), encoding="utf-8")
    return {
        "layout": "ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*",
        "splits": {split: counts[split] for split in SPLITS},
        "split_names": dict(SPLITS),
        "image_hw": list(hw),
        "classes": {
            "things": dict(zip(THING_CLASSES, THING_IDS)),
            "stuff": dict(zip(STUFF_CLASSES, STUFF_IDS)),
            "unlabelled": 0,
            "num_classes": NUM_CLASSES,
        },
    }
