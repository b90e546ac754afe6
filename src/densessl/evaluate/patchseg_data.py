"""Patch-Seg data: the official preprocessing (crop, resize) and label reduction of one split.

iancovert/patch-seg @ fc14f36, ``patchseg/transforms.py`` (``LargestCenterCrop``, ``ReduceAnnotation``,
``CocoLabelAssignment``) and ``patchseg/dataset.py`` (``CocoPatchDataset``, ``Ade20kPatchDataset``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densessl.data.ade20k import ADE_NUM_CLASSES_WITH_OTHER, ADE20KSegmentation
from densessl.data.coco import CocoStuffPatchSegDataset, PairedSegmentationFolder
from densessl.errors import ConfigError, DataError
from densessl.evaluate.patchseg_config import LABEL_REDUCTIONS


def largest_center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Official ``LargestCenterCrop``: the largest centred square, offsets rounded down."""
    side = min(width, height)
    x = (width - side) // 2
    y = (height - side) // 2
    return x, y, x + side, y + side


def preprocess_image(image: Image.Image, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Crop, bilinear resize (PIL, as torchvision's Resize on PIL images), to [0, 1], normalise -> (3, S, S)."""
    image = image.crop(largest_center_crop_box(image.width, image.height))
    image = image.resize((img_size, img_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def preprocess_labels(labels: np.ndarray, img_size: int) -> torch.Tensor:
    """Crop and nearest-resize the label map exactly like the image -> (S, S) int64."""
    h, w = labels.shape
    im = Image.fromarray(labels).crop(largest_center_crop_box(w, h))
    im = im.resize((img_size, img_size), Image.NEAREST)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).astype(np.int64))


def reduce_labels(labels: torch.Tensor, patch_size: int, num_classes: int, reduction: str) -> torch.Tensor:
    """Official ``ReduceAnnotation`` on an (S, S) id map; pixels beyond the last whole patch are dropped.

    * ``union``  -> (g, g, C) uint8 multi-hot of the classes in each patch; class 0 (unlabelled) stays on
      only when it is the patch's only class.
    * ``majority`` -> (g, g) int64: the most frequent id, ties to the smallest id.
    * ``global-union`` -> (C,) uint8 multi-hot of every class in the (patch-grid) image, 0 included.
    """
    g = labels.shape[0] // patch_size
    gw = labels.shape[1] // patch_size
    region = labels[: g * patch_size, : gw * patch_size]
    patches = region.reshape(g, patch_size, gw, patch_size).permute(0, 2, 1, 3).reshape(g * gw, -1)
    counts = torch.zeros(g * gw, num_classes, dtype=torch.int64)
    counts.scatter_add_(1, patches, torch.ones_like(patches))
    if reduction == "union":
        present = counts > 0
        present[present.sum(1) > 1, 0] = False
        return present.to(torch.uint8).reshape(g, gw, num_classes)
    if reduction == "majority":
        return counts.argmax(1).reshape(g, gw)  # argmax returns the first maximum: ties -> smallest id
    if reduction == "global-union":
        return (counts.sum(0) > 0).to(torch.uint8)
    raise ConfigError(f"label_reduction {reduction!r} is not one of {list(LABEL_REDUCTIONS)}")


class PatchSegData(Dataset):
    """(normalised image, reduced target) pairs of one split; ``labels_only`` skips image decoding."""

    def __init__(self, reader: PairedSegmentationFolder, num_classes: int, img_size: int, patch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], reduction: str) -> None:
        self.reader = reader
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.mean, self.std = mean, std
        self.reduction = reduction
        self.labels_only = False

    def __len__(self) -> int:
        return len(self.reader)

    def target(self, index: int, labels: np.ndarray) -> torch.Tensor:
        if labels.size and int(labels.max()) >= self.num_classes:
            raise DataError(f"{self.reader.annotation_paths[index]}: label id {int(labels.max())} out of range "
                            f"for {self.num_classes} classes; check that the maps are the dataset's id maps")
        return reduce_labels(preprocess_labels(labels, self.img_size), self.patch_size, self.num_classes,
                             self.reduction)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.labels_only:
            return torch.zeros(0), self.target(index, self.reader.load_labels(index))
        image, labels = self.reader[index]
        return preprocess_image(image, self.img_size, self.mean, self.std), self.target(index, labels)


def open_patchseg_split(dataset: str, class_set: str, data_root: Path, split: str,
                        limit: int | None) -> tuple[PairedSegmentationFolder, int]:
    """The split's reader and class count: COCO-Stuff with ``class_set`` "all" (183) or "things" (92),
    ADE20K 151 (``class_set`` must be "all": the official ADE20K dataset has no class sets)."""
    if dataset == "coco":
        reader = CocoStuffPatchSegDataset(data_root, split, max_items=limit, class_set=class_set)
        return reader, reader.num_classes
    if class_set != "all":
        raise ConfigError(f"patchseg config: class_set={class_set!r} exists only for coco (the official "
                          f"Ade20kPatchDataset has one class set); use class_set: all for {dataset}")
    return ADE20KSegmentation(data_root, split, max_items=limit), ADE_NUM_CLASSES_WITH_OTHER
