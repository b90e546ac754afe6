"""Training views of the supervised reference: an image with its class index, or an image with its label map.

The image-level views are the standard ImageNet recipe (He et al. 2016 §3.4): RandomResizedCrop, horizontal
flip, normalise. The patch-level views apply the *same* crop and flip to the image (bicubic) and to its label
map (nearest, so no ids are invented at region borders), then reduce the cropped map to one class per patch.
The reduction is Patch-Seg's ``majority`` (iancovert/patch-seg, ``ReduceAnnotation``): the most frequent id
of each patch, ties to the smallest id. The Patch-Seg probe is scored on that same reduction, so the reference
is taught exactly the target the probe reads. Id 0 (unlabelled after ``CocoLabelAssignment``) is a patch's
label only where unlabelled pixels are its majority; the loss ignores those patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from densessl.errors import DataError
from densessl.evaluate.patchseg import reduce_labels
from densessl.models.backbones import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 0  # Patch-Seg's unlabelled class after (label + 1) % 256


def _normalise(image: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class LabelledViews:
    """(PIL image, class index) → {"image": normalised crop, "label": index}."""

    def __init__(self, crop_size: int, crop_scale: tuple[float, float], flip_prob: float):
        self.transform = T.Compose([
            T.RandomResizedCrop(crop_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(flip_prob),
        ])

    def __call__(self, item: tuple[Image.Image, int]) -> dict[str, Any]:
        image, label = item
        return {"image": _normalise(self.transform(image)), "label": torch.tensor(label, dtype=torch.long)}


class PatchLabelledViews:
    """(PIL image, (H, W) uint8 label map) → {"image": normalised crop, "labels": (g, g) int64 patch classes}.

    ``patch_size`` is the backbone's patch (a ViT's patch embedding, a ResNet's output stride); the crop side
    must be a multiple of it so every patch of the crop has a label.
    """

    def __init__(self, crop_size: int, crop_scale: tuple[float, float], flip_prob: float, patch_size: int,
                 num_classes: int):
        if crop_size % patch_size:
            raise ValueError(f"crop_size {crop_size} is not a multiple of the patch size {patch_size}")
        self.crop_size = crop_size
        self.crop_scale = crop_scale
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default
        self.flip_prob = flip_prob
        self.patch_size = patch_size
        self.num_classes = num_classes

    def __call__(self, item: tuple[Image.Image, np.ndarray]) -> dict[str, Any]:
        image, labels = item
        if labels.shape != (image.height, image.width):
            raise DataError(f"label map is {labels.shape[1]}x{labels.shape[0]} but its image is "
                            f"{image.width}x{image.height}; they must have the same size")
        if labels.size and int(labels.max()) >= self.num_classes:
            raise DataError(f"label id {int(labels.max())} out of range for pretrain.supervised.method.num_classes "
                            f"= {self.num_classes}; set num_classes to the dataset's class count")
        label_image = Image.fromarray(labels)
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.crop_scale), list(self.ratio))
        size = [self.crop_size, self.crop_size]
        image = TF.resized_crop(image, top, left, height, width, size, T.InterpolationMode.BICUBIC)
        label_image = TF.resized_crop(label_image, top, left, height, width, size, T.InterpolationMode.NEAREST)
        if torch.rand(1).item() < self.flip_prob:
            image, label_image = TF.hflip(image), TF.hflip(label_image)
        dense = torch.from_numpy(np.asarray(label_image, dtype=np.uint8).astype(np.int64))
        patches = reduce_labels(dense, self.patch_size, self.num_classes, "majority")
        return {"image": _normalise(image), "labels": patches}
