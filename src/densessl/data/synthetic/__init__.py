"""Synthetic datasets in the real on-disk layouts (ImageNet, COCO 2017 + COCO-Stuff, ADE20K, DAVIS 2017,
iNaturalist 2019, LVIS v1, Cityscapes, Pascal VOC 2007+2012).

Why: the real datasets cannot be downloaded where the smoke DAG runs, so each one is replaced by generated
scenes written *exactly* in its real layout (folders, file names, JSON schemas, PNG modes, label ids); the real
loaders read them unchanged, so the smoke run exercises the same code paths as the paper run.

The scenes (``scenes.py``) are textured shapes over textured background regions. Classes differ by shape and
texture only: every instance draws random colours, because with class-specific colours a random-init backbone
already separates the classes and the smoke learning-signal check (trained vs random features on per-patch
probes) would be meaningless. Colour pairs differ mostly in luminance, as in natural images (see
``scenes.random_colors`` for the measurements behind that choice). Generation is deterministic: the same (dataset, size, seed) gives byte-identical
files (one ``numpy`` generator per image, fixed encoder settings, no timestamps), different seeds give different
images. A dataset is written into a temporary sibling folder and renamed into place when complete; the marker
``<root>/.densessl-synthetic.json`` (the summary) is written last and lets a repeated call skip the work.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from densessl.errors import DataError

from . import ade20k, cityscapes, coco, davis, imagenet, inat, lvis, voc
from .scenes import NUM_STUFF, NUM_THINGS, STUFF_CLASSES, THING_CLASSES

DATASETS: tuple[str, ...] = ("imagenet", "coco", "ade20k", "davis", "inat", "lvis", "cityscapes", "voc")
MARKER = ".densessl-synthetic.json"
GENERATOR_VERSION = 2  # 2: luminance-dominant instance colours (scenes.random_colors)

_WRITERS: dict[str, Any] = {
    "imagenet": imagenet,
    "coco": coco,
    "ade20k": ade20k,
    "davis": davis,
    "inat": inat,
    "lvis": lvis,
    "cityscapes": cityscapes,
    "voc": voc,
}


@dataclass(frozen=True)
class SynthSize:
    """How much to generate. ``counts[dataset][split]`` is a number of images ("train"/"val"; for DAVIS a
    number of sequences of ``davis_frames`` frames); ``image_hw[dataset]`` is (height, width) in pixels."""

    name: str
    counts: Mapping[str, Mapping[str, int]]
    image_hw: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: {
            "imagenet": (80, 80),
            "coco": (80, 96),
            "ade20k": (96, 80),
            "davis": (72, 128),
            "inat": (72, 96),
            "lvis": (80, 96),
            "cityscapes": (64, 128),
            "voc": (80, 96),
        }
    )
    davis_frames: int = 10

    @classmethod
    def preset(cls, name: str) -> SynthSize:
        if name not in PRESETS:
            raise DataError(f"synthetic data size {name!r}: unknown preset; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def spec(self, dataset: str) -> dict[str, Any]:
        """The part of this size that determines ``dataset``'s files (recorded in the marker)."""
        out: dict[str, Any] = {
            "name": self.name,
            "counts": dict(self.counts[dataset]),
            "image_hw": list(self.image_hw[dataset]),
        }
        if dataset == "davis":
            out["frames"] = self.davis_frames
        if dataset == "coco":  # the annotation files written: a copy made without the keypoint files is redone
            out["annotation_files"] = ["instances", "stuffthingmaps", "person_keypoints"]
        return out


def resized(size: str | SynthSize, counts: Mapping[str, Mapping[str, int]] | None,
            where: str = "data.synthetic_counts") -> SynthSize:
    """``size`` with some datasets' image counts replaced (``data.synthetic_counts``), the rest as the preset has them.

    Why a per-dataset knob and not another preset: a measurement that needs one larger split (more Cityscapes
    images for a less noisy AP) keeps every other dataset, and so every other job of the DAG, as it is."""
    base = SynthSize.preset(size) if isinstance(size, str) else size
    if not counts:
        return base
    if not isinstance(counts, Mapping):
        raise DataError(f"{where}: {counts!r}; expected a mapping dataset -> {{split: images}}, e.g. "
                        f"{{cityscapes: {{train: 480, val: 120}}}}")
    merged = {name: dict(splits) for name, splits in base.counts.items()}
    for dataset, splits in counts.items():
        if dataset not in DATASETS:
            raise DataError(f"{where}.{dataset}: unknown dataset; choose among {', '.join(DATASETS)}")
        if not isinstance(splits, Mapping) or not splits:
            raise DataError(f"{where}.{dataset}: {splits!r}; expected {{split: images}} with splits "
                            f"{', '.join(merged[dataset])}")
        for split, n in splits.items():
            if split not in merged[dataset]:
                raise DataError(f"{where}.{dataset}.{split}: unknown split; {dataset} has "
                                f"{', '.join(merged[dataset])}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise DataError(f"{where}.{dataset}.{split}: {n!r}; must be a whole number of images ≥ 1")
            merged[dataset][split] = n
    return SynthSize(name=base.name, counts=merged, image_hw=dict(base.image_hw), davis_frames=base.davis_frames)


PRESETS: dict[str, SynthSize] = {
    # Fits CPU: all datasets together in well under a minute on 2 cores.
    "smoke": SynthSize(
        name="smoke",
        counts={
            "imagenet": {"train": 2000, "val": 200},
            "coco": {"train": 800, "val": 200},
            "ade20k": {"train": 800, "val": 200},
            # 32 clips (~85 objects): with 4 (11 objects) the paired standard error of a J&F margin was
            # 1-2.4 points and DINO's +1.7 turned out to be noise (-0.3 +- 0.4 on 48 clips, 3.7 s per
            # backbone; 32 keeps `make smoke` nearer its 15 minutes).
            "davis": {"train": 2, "val": 32},
            "inat": {"train": 480, "val": 96},
            "lvis": {"train": 400, "val": 100},
            "cityscapes": {"train": 160, "val": 40},
            "voc": {"train": 400, "val": 100},  # VOC07+12 trainval, VOC07 test
        },
    ),
    # A few images each, for unit tests.
    "tiny": SynthSize(
        name="tiny",
        counts={
            "imagenet": {"train": 16, "val": 8},
            "coco": {"train": 8, "val": 6},
            "ade20k": {"train": 8, "val": 6},
            "davis": {"train": 1, "val": 2},
            "inat": {"train": 8, "val": 8},
            "lvis": {"train": 8, "val": 4},
            "cityscapes": {"train": 4, "val": 2},
            "voc": {"train": 8, "val": 4},
        },
        davis_frames=4,
    ),
}


def synthesize(
    dataset: str, root: Path, size: str | SynthSize = "smoke", seed: int = 0, *, force: bool = False
) -> dict[str, Any]:
    """Write synthetic ``dataset`` in its real layout under ``root`` and return its summary.

    If ``root`` already holds a complete synthetic copy made with the same size, seed and generator version,
    nothing is written (unless ``force``). A complete copy with other parameters is replaced cleanly. A
    non-empty ``root`` without the marker is never touched (it may be the real dataset)."""
    if dataset not in DATASETS:
        raise DataError(f"synthetic dataset {dataset!r}: unknown; choose one of {', '.join(DATASETS)}")
    size = SynthSize.preset(size) if isinstance(size, str) else size
    root = Path(root)
    identity = {
        "dataset": dataset,
        "seed": int(seed),
        "size": size.spec(dataset),
        "generator_version": GENERATOR_VERSION,
    }
    existing = _read_marker(root)
    if existing is not None and not force and all(existing.get(k) == v for k, v in identity.items()):
        return existing
    if root.exists() and existing is None and any(root.iterdir()):
        raise DataError(
            f"{root}: exists, is not empty and has no {MARKER}; refusing to overwrite what may be real data "
            "(point the synthetic data root elsewhere or delete the folder)"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        counts = dict(size.counts[dataset])
        total = sum(counts.values()) * (size.davis_frames if dataset == "davis" else 1)
        with tqdm(total=total, desc=f"synthetic {dataset}", unit="img", disable=None, leave=False) as bar:
            kwargs: dict[str, Any] = {"frames": size.davis_frames} if dataset == "davis" else {}
            details = _WRITERS[dataset].write(
                tmp, counts, tuple(size.image_hw[dataset]), int(seed), progress=bar.update, **kwargs
            )
        summary = {**identity, **details}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def synthesize_all(
    root: Path, size: str | SynthSize = "smoke", seed: int = 0, datasets: tuple[str, ...] = DATASETS
) -> dict[str, dict[str, Any]]:
    """Each dataset under ``root/<dataset>``."""
    return {d: synthesize(d, Path(root) / d, size, seed) for d in datasets}


def _read_marker(root: Path) -> dict[str, Any] | None:
    path = root / MARKER
    if not path.is_file():
        return None
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return out if isinstance(out, dict) else None


def _swap_into_place(tmp: Path, root: Path) -> None:
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "DATASETS",
    "MARKER",
    "NUM_STUFF",
    "NUM_THINGS",
    "PRESETS",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "SynthSize",
    "synthesize",
    "synthesize_all",
]
