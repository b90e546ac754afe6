"""LOCA views: one reference crop and query crops whose patches know where they land on the reference.

Follows the official preprocessing string of ``configs/loca_imnet1k_base16.py`` and the ops of
``scenic/projects/loca/ops.py`` (google-research/scenic @ 4a38d47):

- reference: area 32–100 %, **no flip** (``cropflip_generatemask(224, 32, flip=False)``);
- query0: inception crop, area 32–100 %, flip p 0.5, solarize p 0.2;
- focal queries: 9 inception crops, area 5–32 %, flip p 0.5;
- every crop: colour jitter p 0.8 (0.4, 0.4, 0.2, 0.1, TF-style, random order), grayscale p 0.2, blur (see
  ``blur`` below), ImageNet mean/std.

Position targets (``position_targets``):

- ``"official"`` (default): the id-map chain of ``ops.py``, reproduced on the integer crop boxes. A 14×14
  map of ids (``init_patch_matching_tracker``) is resized to the reference crop's pixel size with TF's
  nearest-neighbour resize and padded with −1 to the full image (``cropflip_generatemask``); each query
  slices that map at its crop box, resizes it to its crop size and then to its patch grid
  (``inception_crop_with_mask((224, 224), ..., (14, 14))``, ``((96, 96), ..., (6, 6))``), and is flipped
  with its image (``flip_with_mask``). TF2's nearest resize uses half-pixel centres: output ``i`` reads
  input ``min(floor((i + 0.5) · in/out), in − 1)`` in float32 (``HalfPixelScalerForNN``).
- ``"centres"``: the reference patch under each query patch's exact centre. It differs from the official
  chain for about 6 % of targets, always by a neighbouring patch, because the two nearest-neighbour
  resizes round twice.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from densessl.errors import ConfigError
from densessl.models.backbones import IMAGENET_MEAN, IMAGENET_STD

# tf.image.sample_distorted_bounding_box default aspect_ratio_range (ops.py inception_crop_with_mask and
# cropflip_generatemask do not override it).
CROP_RATIO = (0.75, 1.33)
POSITION_TARGETS = ("official", "centres")


@dataclass(frozen=True)
class PixelBox:
    """A crop in source pixel coordinates: [left, right) × [top, bottom)."""

    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height


def reference_positions(query: PixelBox, query_grid: int, query_flipped: bool, reference: PixelBox,
                        reference_grid: int, reference_flipped: bool = False) -> torch.Tensor:
    """``position_targets="centres"``: raster index on the reference patch grid of the reference patch under
    each query patch's exact centre (raster order of the *shown* query), −1 outside.

    The query patch in column ``j`` of a horizontally flipped crop shows source column ``g - 1 - j``, whose
    centre is at the fraction ``1 - (j + 0.5) / g`` of the crop width; the same mirroring applies to the
    reference grid when the reference itself is flipped (``cropflip_generatemask`` flips its id map before
    resizing it). Computed in float64 so that centres lying exactly on patch borders are resolved exactly.
    """
    centres = (torch.arange(query_grid, dtype=torch.float64) + 0.5) / query_grid
    u = 1.0 - centres if query_flipped else centres  # horizontal fraction inside the query crop
    v = centres
    x = query.left + u * query.width   # (g,) source x of each query column's centre
    y = query.top + v * query.height   # (g,) source y of each query row's centre
    rx = (x - reference.left) / reference.width
    ry = (y - reference.top) / reference.height
    col = torch.floor(rx * reference_grid).long()
    row = torch.floor(ry * reference_grid).long()
    if reference_flipped:
        col = reference_grid - 1 - col
    valid_x = (rx >= 0) & (rx < 1)
    valid_y = (ry >= 0) & (ry < 1)
    positions = row[:, None] * reference_grid + col[None, :]
    valid = valid_y[:, None] & valid_x[None, :]
    return torch.where(valid, positions, torch.full_like(positions, -1)).reshape(-1)


def tf_nearest_index(in_size: int, out_size: int) -> torch.Tensor:
    """Input index read by each output index of ``tf.image.resize(..., 'nearest')`` (TF2 ``resize_nearest_neighbor``
    with ``half_pixel_centers=True``): ``min(floor((i + 0.5f) · (in / (float) out)), in − 1)``, in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    return torch.from_numpy(np.clip(idx, 0, in_size - 1))


def official_positions(query: PixelBox, query_size: int, query_grid: int, query_flipped: bool,
                       reference: PixelBox, reference_grid: int, reference_flipped: bool = False) -> torch.Tensor:
    """Target of each query patch (raster order of the *shown* query) as ``ops.py`` makes it, −1 outside.

    Rows and columns are separable, so the chain is evaluated per axis: query-grid index → crop-size index
    (resize ``query_size`` → ``query_grid``) → crop-pixel index (resize crop pixels → ``query_size``) →
    source pixel (the query box offset) → reference-crop pixel (minus the reference offset; outside → −1,
    the padding) → reference id (resize ``reference_grid`` → reference crop pixels; mirrored when the
    reference's id map was flipped before that resize). The query's own flip reverses the final columns.
    """
    def axis(q_start: float, q_len: float, r_start: float, r_len: float, mirror: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q_start, q_len, r_start, r_len = int(q_start), int(q_len), int(r_start), int(r_len)
        crop_px = tf_nearest_index(q_len, query_size)[tf_nearest_index(query_size, query_grid)]
        ref_px = q_start + crop_px - r_start
        valid = (ref_px >= 0) & (ref_px < r_len)
        ids = tf_nearest_index(reference_grid, r_len)[ref_px.clamp(0, r_len - 1)]
        if mirror:
            ids = reference_grid - 1 - ids
        return ids, valid

    rows, valid_r = axis(query.top, query.height, reference.top, reference.height, False)
    cols, valid_c = axis(query.left, query.width, reference.left, reference.width, reference_flipped)
    positions = rows[:, None] * reference_grid + cols[None, :]
    positions = torch.where(valid_r[:, None] & valid_c[None, :], positions, torch.full_like(positions, -1))
    if query_flipped:
        positions = positions.flip(1)
    return positions.reshape(-1)


def tf_color_jitter(image: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
                    ) -> torch.Tensor:
    """``ops.random_color_jitter`` without the coin flip: the four TF ops in random order, clipped after each.

    The TF ops differ from torchvision's ColorJitter: brightness is an *additive* delta
    (``tf.image.random_brightness``), contrast scales around the per-channel mean
    (``tf.image.adjust_contrast``) and saturation scales S in HSV and clips it to [0, 1]
    (``tf.image.adjust_saturation``). Hue shifts H in HSV, as torchvision's ``adjust_hue`` does.
    """
    order = list(range(4))
    random.shuffle(order)  # tf.random.shuffle(tf.range(4))
    for op in order:
        if op == 0 and brightness > 0:
            image = image + random.uniform(-brightness, brightness)
        elif op == 1 and contrast > 0:
            factor = random.uniform(1 - contrast, 1 + contrast)
            mean = image.mean(dim=(-2, -1), keepdim=True)
            image = (image - mean) * factor + mean
        elif op == 2 and saturation > 0:
            image = _scale_hsv_saturation(image, random.uniform(1 - saturation, 1 + saturation))
        elif op == 3 and hue > 0:
            image = TF.adjust_hue(image, random.uniform(-hue, hue))
        image = image.clamp(0.0, 1.0)
    return image


def _scale_hsv_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply HSV saturation by ``factor`` and clip it to [0, 1], keeping hue and value.

    With V = max and m = min over channels, S = (V − m)/V and hue depends only on (c − m)/(V − m); the map
    c ↦ V − s (V − c) keeps V and hue and multiplies S by s, so the clip S ≤ 1 is s ≤ V/(V − m).
    """
    value = image.max(dim=0, keepdim=True).values
    minimum = image.min(dim=0, keepdim=True).values
    spread = value - minimum
    limit = torch.where(spread > 0, value / spread.clamp_min(1e-12), torch.full_like(value, math.inf))
    scale = torch.clamp(torch.full_like(value, factor), max=limit)
    return value - scale * (value - image)


def solarize(image: torch.Tensor) -> torch.Tensor:
    """``ops.random_solarization``'s transform on [0, 1] images: values ≥ 0.5 become 1 − x."""
    return torch.where(image >= 0.5, 1.0 - image, image)


@dataclass
class CropRecipe:
    size: int
    scale: tuple[float, float]
    flip_prob: float
    blur_prob: float
    solarize_prob: float = 0.0


@dataclass
class LOCAViews:
    """Callable applied to each PIL image; returns tensors only (default-collatable).

    ``blur``: ``"code"`` reproduces the shipped preprocessing, where ``random_blur(p)`` passes ``p`` as the
    kernel ``height`` so the kernel has size 1 and blurring is a no-op; ``"intended"`` blurs with
    the probabilities the arguments suggest (reference 1.0, query0 0.1, focal 0.5 [unverified intent]) and
    ``ops.random_blur``'s kernel (size ``crop size // 10``, σ ~ U(0.1, 2.0)).
    """

    patch_size: int
    reference: CropRecipe
    query0: CropRecipe
    focal: CropRecipe
    num_focal: int
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur: str = "code"
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    position_targets: str = "official"  # "official" (ops.py id-map chain) | "centres" (module docstring)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.blur not in ("code", "intended"):
            raise ConfigError(f"pretrain.loca.method.blur: {self.blur!r}; allowed values: code, intended")
        if self.position_targets not in POSITION_TARGETS:
            raise ConfigError(f"pretrain.loca.method.position_targets: {self.position_targets!r}; allowed values: "
                              f"{', '.join(POSITION_TARGETS)}")
        for name, recipe in (("reference_size", self.reference), ("query_size", self.query0),
                             ("focal_size", self.focal)):
            if recipe.size % self.patch_size:
                raise ConfigError(f"pretrain.loca.method.{name}={recipe.size} is not a multiple of the patch size "
                                  f"{self.patch_size}; choose a multiple so that patches tile the crop")
        self._to_tensor = T.ToTensor()
        self._normalize = T.Normalize(self.mean, self.std)

    def grid(self, recipe: CropRecipe) -> int:
        return recipe.size // self.patch_size

    def positions(self, box: PixelBox, recipe: CropRecipe, flipped: bool, ref_box: PixelBox,
                  ref_flipped: bool) -> torch.Tensor:
        """Targets of one query by ``position_targets``."""
        ref_grid = self.grid(self.reference)
        if self.position_targets == "official":
            return official_positions(box, recipe.size, self.grid(recipe), flipped, ref_box, ref_grid, ref_flipped)
        return reference_positions(box, self.grid(recipe), flipped, ref_box, ref_grid, ref_flipped)

    @staticmethod
    def sample_box(image: torch.Tensor, scale: tuple[float, float]) -> PixelBox:
        """Inception-style box (area fraction ``scale``, aspect 3/4–4/3), as ``sample_distorted_bounding_box``."""
        top, left, h, w = T.RandomResizedCrop.get_params(image, scale=list(scale), ratio=list(CROP_RATIO))
        return PixelBox(float(left), float(top), float(w), float(h))

    def _crop(self, image: torch.Tensor, box: PixelBox, recipe: CropRecipe) -> tuple[torch.Tensor, bool]:
        # tf.image.resize(..., BILINEAR) without antialiasing on the [0, 255] → [0, 1] image
        crop = TF.resized_crop(image, int(box.top), int(box.left), int(box.height), int(box.width),
                               [recipe.size, recipe.size], interpolation=T.InterpolationMode.BILINEAR,
                               antialias=False)
        flipped = random.random() < recipe.flip_prob
        if flipped:
            crop = TF.hflip(crop)
        return crop, flipped

    def _photometric(self, crop: torch.Tensor, recipe: CropRecipe) -> torch.Tensor:
        # order of the official pp string: jitter, grayscale, blur, solarize, standardize
        if random.random() < self.jitter_prob:
            crop = tf_color_jitter(crop, *self.jitter)
        if random.random() < self.grayscale_prob:
            crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
        if self.blur == "intended" and random.random() < recipe.blur_prob:
            radius = (recipe.size // 10) // 2  # ops.gaussian_blur: kernel 2·int(ks/2) + 1
            sigma = random.uniform(*self.blur_sigma)
            crop = TF.gaussian_blur(crop, [2 * radius + 1, 2 * radius + 1], [sigma, sigma])
        if random.random() < recipe.solarize_prob:
            crop = solarize(crop)
        return self._normalize(crop)

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        source = self._to_tensor(image.convert("RGB"))
        height, width = source.shape[-2:]
        ref_box = self.sample_box(source, self.reference.scale)
        reference, ref_flipped = self._crop(source, ref_box, self.reference)
        boxes, flips = [ref_box], [ref_flipped]
        q0_box = self.sample_box(source, self.query0.scale)
        query0, q0_flipped = self._crop(source, q0_box, self.query0)
        boxes.append(q0_box)
        flips.append(q0_flipped)
        q0_positions = self.positions(q0_box, self.query0, q0_flipped, ref_box, ref_flipped)

        focal, focal_positions = [], []
        for _ in range(self.num_focal):
            box = self.sample_box(source, self.focal.scale)
            crop, flipped = self._crop(source, box, self.focal)
            focal.append(crop)
            focal_positions.append(self.positions(box, self.focal, flipped, ref_box, ref_flipped))
            boxes.append(box)
            flips.append(flipped)

        focal_grid = self.grid(self.focal)
        return {
            "reference": self._photometric(reference, self.reference),
            "query0": self._photometric(query0, self.query0),
            "focal": (torch.stack([self._photometric(c, self.focal) for c in focal]) if focal
                      else torch.zeros(0, 3, self.focal.size, self.focal.size)),
            "query0_positions": q0_positions,
            "focal_positions": (torch.stack(focal_positions) if focal_positions
                                else torch.zeros(0, focal_grid * focal_grid, dtype=torch.long)),
            # normalised [x0, y0, x1, y1] as data/views.py MultiCropViews records them: reference, query0, focal…
            "boxes": torch.tensor([[b.left / width, b.top / height, b.right / width, b.bottom / height]
                                   for b in boxes]),
            "flips": torch.tensor(flips),
        }
