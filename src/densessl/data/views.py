"""Multi-crop views that remember where each crop came from.

Every crop records its box (in the source image's normalised coordinates) and whether it was flipped, so
dense methods can compute patch correspondences between views. Two conventions exist, and each method uses
its official code's (``box_convention``):

- ``"edges"``: pixel edges over the image size, (left/W, top/H, (left + w)/W, (top + h)/H), the box that
  exactly covers the crop. Used by DINO and SelfPatch (which ignore the geometry) and by the default.
- ``"pixel_index"``: PixPro's ``RandomResizedCropCoord`` (zdaxie/PixPro and sthalles/CLoVE
  ``contrast/data/transform_coord.py``): first and last pixel *indices* over (size − 1),
  (j/(W − 1), i/(H − 1), (j + w − 1)/(W − 1), (i + h − 1)/(H − 1)). Used by CLoVE, whose positive-pair
  threshold is computed on these boxes. The two differ by up to about half a pixel.

LOCA (methods/loca_views.py) and GTSA (methods/gtsa_views.py) build their own views with integer pixel boxes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from densessl.errors import ConfigError
from densessl.models.backbones import IMAGENET_MEAN, IMAGENET_STD

BOX_CONVENTIONS = ("edges", "pixel_index")


def crop_box(left: int, top: int, w: int, h: int, width: int, height: int, convention: str) -> list[float]:
    """Normalised (x1, y1, x2, y2) of the pixel crop [left, left + w) × [top, top + h) by ``convention``."""
    if convention == "edges":
        return [left / width, top / height, (left + w) / width, (top + h) / height]
    if convention == "pixel_index":  # RandomResizedCropCoord: float(j) / (width - 1), ...
        return [left / (width - 1), top / (height - 1), (left + w - 1) / (width - 1), (top + h - 1) / (height - 1)]
    raise ConfigError(f"box_convention={convention!r}: choose one of {list(BOX_CONVENTIONS)}")


@dataclass
class CropSpec:
    """One kind of crop (e.g. DINO's 'global 1'); ``count`` identical-recipe crops are produced."""

    size: int
    scale: tuple[float, float]
    count: int = 1
    blur_prob: float = 0.5
    solarize_prob: float = 0.0


@dataclass
class ColorAugmentation:
    """DINO ``DataAugmentationDINO`` photometric recipe (facebookresearch/dino @ 7c446df ``main_dino.py``)."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_radius: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class MultiCropViews:
    crops: list[CropSpec]
    color: ColorAugmentation = field(default_factory=ColorAugmentation)
    box_convention: str = "edges"  # see the module docstring; CLoVE: "pixel_index"

    def __post_init__(self) -> None:
        if self.box_convention not in BOX_CONVENTIONS:
            raise ConfigError(f"box_convention={self.box_convention!r}: choose one of {list(BOX_CONVENTIONS)}")
        c = self.color
        self._jitter = T.RandomApply([T.ColorJitter(*c.jitter)], p=c.jitter_prob)
        self._gray = T.RandomGrayscale(p=c.grayscale_prob)
        self._to_tensor = T.Compose([T.ToTensor(), T.Normalize(c.mean, c.std)])

    @property
    def num_crops(self) -> int:
        return sum(spec.count for spec in self.crops)

    def _one_crop(self, image: Image.Image, spec: CropSpec) -> tuple[torch.Tensor, list[float], bool]:
        top, left, h, w = T.RandomResizedCrop.get_params(image, scale=spec.scale, ratio=(3 / 4, 4 / 3))
        crop = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size],
                               interpolation=T.InterpolationMode.BICUBIC)
        flipped = random.random() < self.color.flip_prob
        if flipped:
            crop = TF.hflip(crop)
        crop = self._gray(self._jitter(crop))
        if random.random() < spec.blur_prob:
            radius = random.uniform(*self.color.blur_radius)
            crop = crop.filter(ImageFilter.GaussianBlur(radius=radius))
        if random.random() < spec.solarize_prob:
            crop = ImageOps.solarize(crop)
        width, height = image.size
        box = crop_box(left, top, w, h, width, height, self.box_convention)
        return self._to_tensor(crop), box, flipped

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        crops, boxes, flips = [], [], []
        for spec in self.crops:
            for _ in range(spec.count):
                tensor, box, flipped = self._one_crop(image, spec)
                crops.append(tensor)
                boxes.append(box)
                flips.append(flipped)
        return {"crops": crops, "boxes": torch.tensor(boxes), "flips": torch.tensor(flips)}
