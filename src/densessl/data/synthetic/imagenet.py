"""ImageNet-1k layout (ImageFolder): ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``
(validation already sorted into class folders). Each image is a multi-object scene; its class folder is the class
of its dominant (largest, front-most) thing, and the classes are balanced. Pretraining ignores the labels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .scenes import NUM_THINGS, THING_CLASSES, Scene, render_scene, save_jpeg, scene_rng

DATASET_INDEX = 0
# Made-up but stable WordNet-style ids; sorted order = thing class order, so ImageFolder index = thing class.
WNIDS: tuple[str, ...] = tuple(f"n0{1000000 + 123457 * k:07d}" for k in range(NUM_THINGS))


def image_class(index: int) -> int:
    return index % NUM_THINGS


def render(seed: int, split_index: int, index: int, hw: tuple[int, int]) -> Scene:
    return render_scene(
        scene_rng(seed, DATASET_INDEX, split_index, index), *hw, main_class=image_class(index)
    )


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    val_number = 0
    for split_index, split in enumerate(("train", "val")):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            scene = render(seed, split_index, i, hw)
            wnid = WNIDS[image_class(i)]
            if split == "train":
                name = f"{wnid}_{i}.JPEG"
            else:
                val_number += 1
                name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
            save_jpeg(root / split / wnid / name, scene.image)
            if progress:
                progress(1)
    return {
        "layout": "ImageNet-1k ImageFolder: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG",
        "splits": {"train": counts["train"], "val": counts["val"]},
        "image_hw": list(hw),
        "classes": {wnid: name for wnid, name in zip(WNIDS, THING_CLASSES)},
    }
