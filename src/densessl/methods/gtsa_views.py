"""GTSA views: overlapping multi-crops, optional flip, four-fold rotation, with the geometry recorded.

Follows the official ``util/gtsa_transforms.py`` (``GTSATransforms``, bok3948/GTSA @ c0dfe2b, adapted there from
Leopart):

* RandomResizedCrop (bilinear) for ``global_count`` global and ``local_count`` local crops; every crop after the
  first is re-sampled until its intersection with each earlier global crop exceeds ``min_intersection`` of the
  image area (``GTSATransforms.__call__``: the two global crops need twice that);
* colour jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2] p 0.2, no solarisation;
* then a random rotation by one of {0, 90, 180, 270}° counter-clockwise (``RandomRotationReturnsDegree`` uses
  ``torchvision.transforms.functional.rotate``, whose positive angles turn the image counter-clockwise).

The official transform has no horizontal flip; ``flip_prob`` (default 0.0) adds one for ablations, applied right
after the crop (before rotation), and the alignment in ``gtsa.py`` undoes it.

What is recorded differs in form, not content: the official code returns the pairwise intersection boxes already
in crop pixels ("gc": in the global crop's frame, "all": in the other crop's frame, both rotated with their crop).
Here every crop records its box in normalised source coordinates, its flip and its angle, and ``pair_boxes``
derives the same pairwise boxes on the training device, so the geometry exists once and is tested once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from densessl.errors import ConfigError, DataError
from densessl.methods.gtsa_config import ALLOWED_ANGLES
from densessl.models.backbones import IMAGENET_MEAN, IMAGENET_STD

_PIL_ROTATIONS = {  # PIL's ROTATE_* turn counter-clockwise, as torchvision's rotate(img, angle)
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


def crop_and_flip(image: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool) -> Image.Image:
    """Resized crop of the pixel box (left, top, right, bottom), bilinear as RandomResizedCrop, then the flip."""
    left, top, right, bottom = box
    crop = TF.resized_crop(image, top, left, bottom - top, right - left, [size, size],
                           interpolation=T.InterpolationMode.BILINEAR)
    return TF.hflip(crop) if flip else crop


def render_crop(image: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool,
                angle: int) -> Image.Image:
    """The geometric part of a view alone: resized crop → flip → rotation (what ``to_crop_frame`` models)."""
    return rotate_image(crop_and_flip(image, box, size, flip), angle)


def rotate_image(image: Image.Image, angle: int) -> Image.Image:
    if angle not in ALLOWED_ANGLES:
        raise ConfigError(f"GTSA rotation angle {angle}: allowed angles are {ALLOWED_ANGLES}")
    return image if angle == 0 else image.transpose(_PIL_ROTATIONS[angle])


def quarter_turns(angles: torch.Tensor) -> torch.Tensor:
    """Angles in degrees {0, 90, 180, 270} → counter-clockwise quarter turns {0, 1, 2, 3}.

    These are also the rotation-prediction labels (official ``GTSA.rot_predict`` maps 0/90/180/270 → 0/1/2/3).
    """
    angles = angles.long()
    if bool(((angles % 90) != 0).any()) or bool(((angles < 0) | (angles > 270)).any()):
        bad = sorted({int(a) for a in angles.flatten().tolist() if a not in ALLOWED_ANGLES})
        raise DataError(f"GTSA batch 'angles' holds {bad}; views must rotate by one of {ALLOWED_ANGLES} degrees")
    return angles // 90


def _rotate_box_ccw(box: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """One counter-clockwise quarter turn of an (x1, y1, x2, y2) box inside a square of side ``size``.

    A point (x, y) moves to (y, size − x): the top-right corner goes to the top-left (official ``rotate_bbox``,
    angle 90).
    """
    x1, y1, x2, y2 = box.unbind(-1)
    return torch.stack((y1, size - x2, y2, size - x1), dim=-1)


def to_crop_frame(region: torch.Tensor, crop_box: torch.Tensor, size: torch.Tensor | float,
                  flip: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Express ``region`` (normalised source coordinates) in a crop's pixels after its flip and rotation.

    All arguments broadcast: region/crop_box (..., 4) as (x1, y1, x2, y2); size, flip, turns (...).
    """
    size = torch.as_tensor(size, dtype=region.dtype, device=region.device).expand(region.shape[:-1])
    origin = torch.cat((crop_box[..., :2], crop_box[..., :2]), dim=-1)
    extent = crop_box[..., 2:] - crop_box[..., :2]
    scale = torch.cat((extent, extent), dim=-1)
    box = (region - origin) / scale * size.unsqueeze(-1)
    x1, y1, x2, y2 = box.unbind(-1)
    flipped = torch.stack((size - x2, y1, size - x1, y2), dim=-1)
    box = torch.where(flip.unsqueeze(-1).expand_as(box), flipped, box)
    turns = turns.expand(region.shape[:-1])
    for step in range(3):  # turns ∈ {0..3}: apply the quarter turn to those with more than `step` turns left
        box = torch.where((turns > step).unsqueeze(-1), _rotate_box_ccw(box, size), box)
    return box


def pair_boxes(boxes: torch.Tensor, flips: torch.Tensor, angles: torch.Tensor, sizes: list[int] | torch.Tensor,
               num_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection of every (global iq, view v) pair, in crop pixels of iq and of v.

    boxes (B, N, 4) normalised source boxes, flips (B, N), angles (B, N) degrees, sizes (N,) crop sides.
    Returns ``(in_global, in_view)``, both (B, num_global, N, 4): ``in_global[b, iq, v]`` is the official
    ``bbox["gc"][b, iq, v]`` and ``in_view[b, iq, v]`` the official ``bbox["all"][b, v, iq]``
    (``GTSATransforms.calculate_bboxes``).
    """
    sizes = torch.as_tensor(sizes, dtype=boxes.dtype, device=boxes.device)
    turns = quarter_turns(angles)
    g = boxes[:, :num_global, None, :]              # (B, G, 1, 4)
    v = boxes[:, None, :, :]                        # (B, 1, N, 4)
    inter = torch.cat((torch.maximum(g[..., :2], v[..., :2]), torch.minimum(g[..., 2:], v[..., 2:])), dim=-1)
    in_global = to_crop_frame(inter, g, sizes[None, :num_global, None], flips[:, :num_global, None],
                              turns[:, :num_global, None])
    in_view = to_crop_frame(inter, v, sizes[None, None, :], flips[:, None, :], turns[:, None, :])
    return in_global, in_view


@dataclass
class GTSAViews:
    """Per-image view generator (runs in DataLoader workers); defaults are ``GTSATransforms``' (see GTSAConfig)."""

    global_size: int = 224
    local_size: int = 96
    global_count: int = 2
    local_count: int = 8
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.3)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_intersection: float = 0.01
    global_intersection_factor: float = 2.0
    angles: tuple[int, ...] = ALLOWED_ANGLES
    flip_prob: float = 0.0
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.2
    blur_radius: tuple[float, float] = (0.1, 2.0)
    max_attempts: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        bad = [a for a in self.angles if a not in ALLOWED_ANGLES]
        if bad or not self.angles:
            raise ConfigError(f"GTSA views: angles {list(self.angles)}; use a non-empty subset of {ALLOWED_ANGLES}")
        if not 0 < self.min_intersection < 1:
            raise ConfigError(f"GTSA views: min_intersection={self.min_intersection} must lie in (0, 1)")
        if self.global_count < 1:
            raise ConfigError("GTSA views: global_crops_number must be ≥ 1 (the teacher sees the global crops)")
        self._jitter = T.RandomApply([T.ColorJitter(*self.jitter)], p=self.jitter_prob)
        self._gray = T.RandomGrayscale(p=self.grayscale_prob)
        self._to_tensor = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    @property
    def sizes(self) -> list[int]:
        return [self.global_size] * self.global_count + [self.local_size] * self.local_count

    @property
    def num_crops(self) -> int:
        return self.global_count + self.local_count

    def sample_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Pixel boxes (left, top, right, bottom), each overlapping every earlier global crop enough.

        Official ``GTSATransforms.__call__``: threshold ``int(W·H·min_intersection)`` pixels, doubled for the
        global crops, compared with a strict '>'. The official loop retries forever; here a recipe that cannot be
        satisfied fails after ``max_attempts`` tries with the fields to change.
        """
        image = Image.new("L", (width, height))  # get_params only reads the size
        threshold = int(width * height * self.min_intersection)
        placed: list[tuple[int, int, int, int]] = []
        for i in range(self.num_crops):
            is_global = i < self.global_count
            scale = self.global_scale if is_global else self.local_scale
            need = threshold * self.global_intersection_factor if is_global else threshold
            for _ in range(self.max_attempts):
                top, left, h, w = T.RandomResizedCrop.get_params(image, scale=list(scale), ratio=list(self.ratio))
                box = (left, top, left + w, top + h)
                if all(_overlap(box, other) > need for other in placed[:self.global_count]):
                    break
            else:
                raise DataError(
                    f"GTSA views: crop {i} never overlapped the global crops by more than {need} px² in "
                    f"{self.max_attempts} tries on a {width}×{height} image; lower min_intersection or raise "
                    f"global_crops_scale / local_crops_scale")
            placed.append(box)
        return placed

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        width, height = image.size
        crops, boxes, flips, angles = [], [], [], []
        for box, size in zip(self.sample_boxes(width, height), self.sizes):
            flip = random.random() < self.flip_prob
            crop = self._gray(self._jitter(crop_and_flip(image, box, size, flip)))
            if random.random() < self.blur_prob:
                crop = crop.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.blur_radius)))
            angle = random.choice(self.angles)
            crops.append(self._to_tensor(rotate_image(crop, angle)))  # rotation last, as the official order
            left, top, right, bottom = box
            boxes.append([left / width, top / height, right / width, bottom / height])
            flips.append(flip)
            angles.append(angle)
        return {"crops": crops, "boxes": torch.tensor(boxes, dtype=torch.float32),
                "flips": torch.tensor(flips, dtype=torch.bool), "angles": torch.tensor(angles, dtype=torch.long)}


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)
