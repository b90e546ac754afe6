"""COCO person keypoints read through torchvision's own ``CocoDetection`` (pycocotools underneath), turned into
the targets torchvision's Keypoint R-CNN takes.

Follows detectron2's data path for ``keypoints_coco_2017_{train,val}`` (detectron2/data/datasets/coco.py,
data/detection_utils.py, data/build.py): crowd annotations are not training targets; training images need at
least ``MIN_KEYPOINTS_PER_IMAGE`` labelled keypoints (``filter_images_with_few_keypoints``, which also drops
images without annotations, ``FILTER_EMPTY_ANNOTATIONS``); COCO's integer keypoint pixel indices get +0.5 to
become continuous coordinates; a horizontal flip mirrors x (``width - x``) and swaps left and right joints.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection
from torchvision.transforms.functional import to_tensor

from densessl.errors import DataError

SPLITS = {"train": "train2017", "val": "val2017"}
# COCO joint order: nose, then (left, right) pairs; a flip swaps each pair (detectron2 keypoint_flip_map).
COCO_FLIP_INDEX = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"person_keypoints_{SPLITS[split]}.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / "images" / SPLITS[split]


def open_coco(root: Path, split: str) -> CocoDetection:
    """torchvision ``CocoDetection`` over ``images/<split>2017`` and ``person_keypoints_<split>2017.json``."""
    ann, images = annotation_file(root, split), image_dir(root, split)
    if not ann.is_file():
        raise DataError(f"{ann}: COCO keypoint annotations not found; put annotations_trainval2017's "
                        f"person_keypoints_*.json there (real data) or re-run `python -m densessl data --dataset coco` "
                        f"(synthetic data writes them)")
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found; the keypoint protocol reads <coco root>/images/"
                        f"{SPLITS[split]}/*.jpg")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading progress
        try:
            return CocoDetection(str(images), str(ann))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{ann}: not a COCO annotation file ({exc}); re-download or re-generate it") from exc


def num_labelled(anns: list[dict[str, Any]]) -> int:
    return sum(int(v > 0) for a in anns if not a.get("iscrowd", 0) for v in a.get("keypoints", [])[2::3])


class KeypointTargets(Dataset):
    """Items ``(image tensor in [0, 1], target)`` with target keys ``boxes`` (x0, y0, x1, y1), ``labels``
    (all 1: person), ``keypoints`` (N, K, 3: x, y, visibility) and ``image_id``.

    ``train=True`` keeps the images detectron2 trains on (see module doc) and flips with ``flip_prob`` using
    the global ``random`` module, which the resumable loader seeds per (epoch, image)."""

    def __init__(self, root: Path, split: str, train: bool, *, num_keypoints: int = 17, flip_prob: float = 0.0,
                 min_keypoints: int = 1, max_items: int | None = None) -> None:
        self.coco_dataset = open_coco(root, split)
        self.coco = self.coco_dataset.coco
        self.train, self.flip_prob, self.num_keypoints = train, flip_prob, num_keypoints
        cats = self.coco.loadCats(self.coco.getCatIds())
        person = [c for c in cats if c.get("name") == "person"]
        if len(person) != 1 or len(person[0].get("keypoints", [])) != num_keypoints:
            raise DataError(f"{annotation_file(root, split)}: expected one 'person' category with {num_keypoints} "
                            f"keypoint names (COCO person_keypoints format), found {[c.get('name') for c in cats]}")
        self.category_id = int(person[0]["id"])
        indices = list(range(len(self.coco_dataset.ids)))
        if train:
            indices = [i for i in indices
                       if num_labelled(self.coco.imgToAnns[self.coco_dataset.ids[i]]) >= max(min_keypoints, 1)]
        if max_items is not None:
            indices = indices[:max_items]
        if not indices:
            raise DataError(f"{annotation_file(root, split)}: no {'training ' if train else ''}images with labelled "
                            f"person keypoints")
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def image_id(self, item: int) -> int:
        return int(self.coco_dataset.ids[self.indices[item]])

    def __getitem__(self, item: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, anns = self.coco_dataset[self.indices[item]]
        image = to_tensor(image.convert("RGB"))
        anns = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        k = self.num_keypoints
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        keypoints = torch.tensor([a.get("keypoints", [0] * 3 * k) for a in anns], dtype=torch.float32).reshape(-1, k, 3)
        keypoints[..., :2] += 0.5  # detectron2 datasets/coco.py: integer pixel indices -> continuous coordinates
        if self.train and self.flip_prob > 0 and random.random() < self.flip_prob:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            keypoints[..., 0] = width - keypoints[..., 0]
            keypoints = keypoints[:, list(COCO_FLIP_INDEX[:k]) if k == 17 else list(range(k))]
        target = {"boxes": boxes, "labels": torch.ones(len(anns), dtype=torch.int64), "keypoints": keypoints,
                  "image_id": torch.tensor(self.image_id(item))}
        return image, target


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Detection batches stay lists: the images differ in size (the model pads them itself)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
