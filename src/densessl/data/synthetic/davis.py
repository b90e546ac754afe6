"""DAVIS 2017 (trainval, 480p folder names) layout:

    JPEGImages/480p/<sequence>/00000.jpg ...
    Annotations/480p/<sequence>/00000.png ...   (palette 'P' PNGs, 0 = background, 1..n = objects)
    ImageSets/2017/{train,val}.txt

Objects move along smooth crossing paths, scale, rotate and squash, and occlude one another over a panning
textured background; objects in a clip share colours (and often class), and the background reuses them, so
label propagation cannot be solved by colour alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densessl.data.davis import voc_palette

from .scenes import Frame, render_sequence, save_jpeg, save_png, scene_rng

DATASET_INDEX = 3
RESOLUTION = "480p"  # the folder name of the real release (our frames are smaller)


def palette() -> list[int]:
    """The DAVIS / Pascal VOC colour map, the one the real annotations carry (shared with the loader)."""
    return voc_palette()


def sequence_name(split: str, index: int) -> str:
    return f"synth-{split}-{index:02d}"


def render(seed: int, split_index: int, index: int, hw: tuple[int, int], frames: int) -> list[Frame]:
    return render_sequence(scene_rng(seed, DATASET_INDEX, split_index, index), *hw, frames)


def write(
    root: Path,
    counts: Mapping[str, int],
    hw: tuple[int, int],
    seed: int,
    progress: Callable[[int], object] | None = None,
    frames: int = 10,
) -> dict[str, Any]:
    pal = palette()
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True)
    n_objects = {}
    for split_index, split in enumerate(("train", "val")):
        names = []
        for i in range(counts[split]):
            name = sequence_name(split, i)
            names.append(name)
            img_dir = root / "JPEGImages" / RESOLUTION / name
            ann_dir = root / "Annotations" / RESOLUTION / name
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            clip = render(seed, split_index, i, hw, frames)
            n_objects[name] = int(max(f.objects.max() for f in clip))
            for f, frame in enumerate(clip):
                save_jpeg(img_dir / f"{f:05d}.jpg", frame.image)
                ann = Image.fromarray(frame.objects.astype(np.uint8), "P")
                ann.putpalette(pal)
                save_png(ann_dir / f"{f:05d}.png", ann)
                if progress:
                    progress(1)
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return {
        "layout": "DAVIS 2017: JPEGImages/480p/<seq>/*.jpg, Annotations/480p/<seq>/*.png, ImageSets/2017/*.txt",
        "splits": {split: counts[split] for split in ("train", "val")},
        "frames": frames,
        "image_hw": list(hw),
        "objects_per_sequence": n_objects,
    }
