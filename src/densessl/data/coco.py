"""COCO-Stuff semantic maps in the Patch-Seg layout (iancovert/patch-seg @ fc14f36 ``patchseg/dataset.py``).

Layout (iancovert/patch-seg ``CocoPatchDataset``; COCO 2017 images with the ``stuffthingmaps_trainval2017``
COCO-Stuff maps, as ``scripts/download-coco.sh`` fetches them)::

    <root>/images/{train2017,val2017}/*.jpg
    <root>/annotations/{train2017,val2017}/*.png     # stuffthingmaps_trainval2017, uint8

The maps hold COCO-Stuff ids 0..181 and 255 = unlabelled. Patch-Seg's ``CocoLabelAssignment`` shifts them
with ``label <- (label + 1) % 256`` so that 0 = unlabelled and 1..182 are the classes: 183 classes in all.

This module also holds :class:`PairedSegmentationFolder`, the image/map pairing shared with the ADE20K
reader, so both fail with the same clear messages when a folder is missing, empty or mispaired.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ANNOTATION_SUFFIXES = (".png",)

COCO_SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}
COCO_NUM_CLASSES = 183  # Patch-Seg: 0 unlabelled, 1-91 things, 92-182 stuff
# Patch-Seg ``CocoPatchDataset(class_set=...)``: "all" 183 classes, "things" 92 (stuff folded into 0).
COCO_CLASS_SETS = {"all": COCO_NUM_CLASSES, "things": 92}
COCO_UNLABELLED = 255  # raw COCO-Stuff id of unlabelled pixels


def _list_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map stem -> path of the files in ``folder`` with one of ``suffixes`` (dot-files skipped)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
            continue
        if p.stem in out:
            raise DataError(f"{p}: two files share the stem {p.stem!r} ({out[p.stem].name} and {p.name}); "
                            f"keep one per image")
        out[p.stem] = p
    return out


def load_label_map(path: Path) -> np.ndarray:
    """Read a single-channel uint8 label PNG as an (H, W) uint8 array of class ids.

    Palette ('P') PNGs are read as their indices, which is what both COCO-Stuff and ADE20K store; an RGB
    colour-coded map would silently give wrong ids, so it is refused.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DataError(f"{path}: label map has PIL mode {im.mode!r}, expected a single-channel 8-bit "
                                f"PNG ('L' or 'P') of class ids; convert colour-coded maps to ids first")
            arr = np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL raises several types for truncated/corrupt files
        raise DataError(f"{path}: cannot read label map ({exc}); re-download or re-extract the annotations") from exc
    return arr


def load_rgb(path: Path) -> Image.Image:
    """Read an image as RGB (grayscale COCO images exist and must become 3 channels, as the official code)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({exc}); re-download or re-extract the images") from exc


class PairedSegmentationFolder:
    """Images paired by file stem with same-sized label maps, sorted by stem.

    ``max_items`` keeps the first N pairs in sorted order (smoke runs). Items are
    ``(PIL RGB image, np.uint8 (H, W) labels)``; :meth:`transform_labels` lets a dataset remap ids.
    """

    def __init__(self, image_dir: Path, annotation_dir: Path, max_items: int | None = None,
                 fix_hint: str = "") -> None:
        self.image_dir = Path(image_dir)
        self.annotation_dir = Path(annotation_dir)
        hint = f"; {fix_hint}" if fix_hint else ""
        for folder, what in ((self.image_dir, "images"), (self.annotation_dir, "label maps")):
            if not folder.is_dir():
                raise DataError(f"{folder}: folder of {what} not found{hint}")
        images = _list_files(self.image_dir, IMAGE_SUFFIXES)
        annotations = _list_files(self.annotation_dir, ANNOTATION_SUFFIXES)
        if not images:
            raise DataError(f"{self.image_dir}: no images ({'/'.join(IMAGE_SUFFIXES)}) found{hint}")
        if not annotations:
            raise DataError(f"{self.annotation_dir}: no label maps (.png) found{hint}")
        only_img = sorted(set(images) - set(annotations))
        only_ann = sorted(set(annotations) - set(images))
        if only_img:
            raise DataError(f"{images[only_img[0]]}: image has no label map "
                            f"{self.annotation_dir / (only_img[0] + '.png')} ({len(only_img)} unpaired images "
                            f"in all); images and maps must pair one-to-one by file name")
        if only_ann:
            raise DataError(f"{annotations[only_ann[0]]}: label map has no image in {self.image_dir} "
                            f"({len(only_ann)} unpaired maps in all); images and maps must pair one-to-one "
                            f"by file name")
        stems = sorted(images)
        if max_items is not None:
            if max_items < 1:
                raise DataError(f"max_items={max_items}: expected a positive number of items or None")
            stems = stems[:max_items]
        self.stems: list[str] = stems
        self.image_paths: list[Path] = [images[s] for s in stems]
        self.annotation_paths: list[Path] = [annotations[s] for s in stems]

    def __len__(self) -> int:
        return len(self.stems)

    def transform_labels(self, labels: np.ndarray) -> np.ndarray:
        return labels

    def load_labels(self, index: int) -> np.ndarray:
        """Only the (remapped) label map: class statistics need no image decoding."""
        return self.transform_labels(load_label_map(self.annotation_paths[index]))

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image = load_rgb(self.image_paths[index])
        labels = load_label_map(self.annotation_paths[index])
        if labels.shape != (image.height, image.width):
            raise DataError(f"{self.annotation_paths[index]}: label map is {labels.shape[1]}x{labels.shape[0]} "
                            f"but image {self.image_paths[index].name} is {image.width}x{image.height}; "
                            f"they must have the same size")
        return image, self.transform_labels(labels)


def coco_label_assignment(labels: np.ndarray, class_set: str = "all") -> np.ndarray:
    """Patch-Seg ``CocoLabelAssignment``: (label + 1) % 256, so 255 -> 0, id k -> k + 1; with
    ``class_set='things'`` every id above 91 (the stuff classes 92-182) becomes 0 (iancovert/patch-seg
    ``patchseg/transforms.py``)."""
    if class_set not in COCO_CLASS_SETS:
        raise DataError(f"COCO class_set {class_set!r} unknown; expected one of {sorted(COCO_CLASS_SETS)}")
    out = ((labels.astype(np.int16) + 1) % 256).astype(np.uint8)
    if class_set == "things":
        out[out > 91] = 0
    return out


class CocoStuffPatchSegDataset(PairedSegmentationFolder):
    """COCO-Stuff split in the Patch-Seg layout; labels already shifted to Patch-Seg's 183 classes.

    ``label_assignment=False`` returns the raw COCO-Stuff ids (0..181, 255 unlabelled) instead.
    """

    num_classes = COCO_NUM_CLASSES

    def __init__(self, root: str | Path, split: str = "train", max_items: int | None = None,
                 label_assignment: bool = True, class_set: str = "all") -> None:
        if class_set not in COCO_CLASS_SETS:
            raise DataError(f"COCO class_set {class_set!r} unknown; expected one of {sorted(COCO_CLASS_SETS)}")
        self.class_set = class_set
        self.num_classes = COCO_CLASS_SETS[class_set]
        if split not in COCO_SPLITS:
            raise DataError(f"COCO split {split!r} unknown; expected one of {sorted(COCO_SPLITS)}")
        root = Path(root)
        folder = COCO_SPLITS[split]
        self.root = root
        self.split = folder
        self.label_assignment = label_assignment
        super().__init__(root / "images" / folder, root / "annotations" / folder, max_items,
                         fix_hint=(f"expected the Patch-Seg COCO layout <root>/images/{folder}/*.jpg and "
                                   f"<root>/annotations/{folder}/*.png (stuffthingmaps_trainval2017) under "
                                   f"{root}; point the data root there"))

    def transform_labels(self, labels: np.ndarray) -> np.ndarray:
        return coco_label_assignment(labels, self.class_set) if self.label_assignment else labels
