"""Dataset manifests: the one file downstream stages read to find a dataset and pin its content.

A manifest records the dataset root, file counts and a content fingerprint. At smoke scale the fingerprint
hashes every byte; for real datasets (hundreds of GB) it hashes the sorted file listing with sizes, which
catches missing, added or truncated files without reading the data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from densessl.errors import DataError
from densessl.io import read_json
from densessl.progress import Progress

FULL_HASH_LIMIT_BYTES = 2 << 30

# Folders a dataset root must contain (relative paths), per layout in docs/datasets.md.
EXPECTED_LAYOUT: dict[str, list[str]] = {
    "imagenet": ["train"],
    "coco": ["images/train2017", "images/val2017", "annotations/train2017", "annotations/val2017"],
    "ade20k": ["ADEChallengeData2016/images/training", "ADEChallengeData2016/images/validation",
               "ADEChallengeData2016/annotations/training", "ADEChallengeData2016/annotations/validation"],
    "davis": ["DAVIS/JPEGImages/480p", "DAVIS/Annotations/480p", "DAVIS/ImageSets/2017"],
    "inat": [],  # train2019.json / val2019.json + train_val2019/ images: checked by data/inat.py on load
    "imagenet21k": ["train"],
    "lvis": [],  # lvis_v1_*.json in annotations/ or the root + COCO images: checked by the mmdet protocols
    "cityscapes": ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"],
    "voc": ["VOCdevkit/VOC2007/Annotations", "VOCdevkit/VOC2007/ImageSets/Main", "VOCdevkit/VOC2012/Annotations"],
}


def check_layout(dataset: str, root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: dataset root of {dataset!r} not found; set data.roots.{dataset} in config.yaml")
    missing = [rel for rel in EXPECTED_LAYOUT.get(dataset, []) if not (root / rel).is_dir()]
    if dataset == "ade20k" and missing and (root / "images" / "training").is_dir():
        return  # root points at ADEChallengeData2016 itself
    if dataset == "davis" and missing and (root / "JPEGImages" / "480p").is_dir():
        return  # root points at DAVIS itself
    if dataset == "voc" and missing and (root / "VOC2007" / "Annotations").is_dir():
        return  # root points at VOCdevkit itself
    if missing:
        raise DataError(f"{root}: not a {dataset} layout; missing folder(s) {missing} "
                        f"(see docs/datasets.md for the expected layout)")
    if dataset == "imagenet" and not _has_class_image(root / "train"):
        raise DataError(f"{root / 'train'}: no images in '<class>/' subfolders (expected "
                        f"train/<wnid>/*.JPEG, as torchvision's ImageFolder reads it); extract the ImageNet train "
                        f"archive there or point data.roots.imagenet at the folder that holds train/")


def _has_class_image(folder: Path) -> bool:
    """Whether some class subfolder of ``folder`` holds an image: stops at the first one, so a real ImageNet
    (1.28 M files) is not listed here; the fingerprint below counts everything."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    with os.scandir(folder) as classes:
        for entry in classes:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            with os.scandir(entry.path) as files:
                if any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in files):
                    return True
    return False


def fingerprint(root: Path) -> dict[str, Any]:
    # densessl's own records (completion marker, state, downloaded archives) are not dataset content
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".densessl") for part in p.relative_to(root).parts))
    total = sum(p.stat().st_size for p in files)
    listing = hashlib.sha256()
    content = hashlib.sha256() if total <= FULL_HASH_LIMIT_BYTES else None
    lines = Progress(f"fingerprint {root}", len(files), unit="files")  # stat (and hash) of every file
    for p in files:
        rel = p.relative_to(root).as_posix()
        size = p.stat().st_size
        listing.update(f"{rel}\t{size}\n".encode())
        if content is not None:
            content.update(rel.encode() + b"\0")
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    content.update(block)
        lines.update(1)
    lines.finish()
    counts: dict[str, int] = {}
    for p in files:
        top = p.relative_to(root).parts[0]
        counts[top] = counts.get(top, 0) + 1
    return {"num_files": len(files), "bytes": total, "files_per_top_folder": counts,
            "listing_sha256": listing.hexdigest(),
            "content_sha256": content.hexdigest() if content is not None else None}


def data_root(manifest_path: str | os.PathLike[str]) -> Path:
    manifest = read_json(manifest_path)
    root = Path(manifest.get("root", ""))
    if not root.is_absolute():
        root = Path(manifest_path).parent / root
    if not root.is_dir():
        raise DataError(f"{manifest_path}: field 'root' = {str(root)!r} is not a folder; re-run the data stage")
    return root
