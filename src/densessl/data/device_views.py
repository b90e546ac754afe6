"""The multi-crop views of data/views.py, built for a whole batch on the training device.

The CPU path (``MultiCropViews``) crops, flips and colours each image with PIL in DataLoader workers. This path
takes a batch of decoded uint8 images already on the device (data/jpeg_bytes.py) and makes the same views
for all of them at once, each sample with its own crop box, flip and photometric draws:

- **crop boxes**: torchvision's ``RandomResizedCrop.get_params`` (the CPU path's sampler: 10 draws of area ×
  log-uniform aspect ratio, the first that fits, else the centre crop clamped to the ratio range), vectorised
  over samples whose images differ in size, in the form of kornia's ``ResizedCropGenerator``
  (kornia 0.9.0 ``augmentation/random_generator/_2d/crop.py``). Kornia's ``RandomResizedCrop`` itself is not
  used because one call samples every box for one input size, and decoded JPEGs differ in size;
- **resize**: ``torchvision.ops.roi_align`` over the integer pixel box (``aligned=True``: the box's edges are
  the pixel edges) with adaptive sampling, which averages ⌈box / output⌉² bilinear samples per output pixel,
  so that downscaling is antialiased as PIL's resize is (the CPU path resizes with PIL bicubic);
- **flip, colour, blur, solarize, normalise**: ``kornia.augmentation`` (``RandomHorizontalFlip``,
  ``ColorJitter``, ``RandomGrayscale``, ``RandomGaussianBlur``, ``RandomSolarize``, ``Normalize``) with the
  probabilities and ranges of the CPU path's ``ColorAugmentation``/``CropSpec``; the flip flags are read from
  the flip's sampled parameters (``_params["batch_prob"]``).

The batch has the CPU path's keys, shapes and meaning after collation: ``crops`` a list of (B, 3, S, S) in
crop order, ``boxes`` (B, n, 4) in the views' ``box_convention``, ``flips`` (B, n) bool.
Deliberate differences to the CPU path are in docs/fidelity.md.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import kornia.augmentation as K
import torch
from torch import nn
from torchvision.ops import roi_align

from densessl.data.views import BOX_CONVENTIONS, CropSpec, MultiCropViews
from densessl.errors import ConfigError

RATIO = (3 / 4, 4 / 3)  # the CPU path's RandomResizedCrop ratio
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128): values >= 128 are inverted


def sample_resized_crops(heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float],
                         ratio: tuple[float, float] = RATIO, attempts: int = 10) -> torch.Tensor:
    """(N, 4) integer (top, left, height, width) crops of images of sizes ``heights``/``widths`` (N,), drawn as
    torchvision's ``RandomResizedCrop.get_params`` draws one: ``attempts`` (area fraction ~ U(scale),
    log aspect ~ U(log ratio)) pairs, the first whose rounded w × h fits the image; else the whole image cut to
    the ratio range, centred. Offsets are uniform over the valid positions. Uses the global CPU generator."""
    n = heights.numel()
    h_img = heights.to(torch.float64).reshape(n, 1)
    w_img = widths.to(torch.float64).reshape(n, 1)
    area = h_img * w_img * torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(n, attempts, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = (fits.cumsum(1) == 1) & fits  # the first fitting attempt, as the loop in get_params stops there
    found = fits.any(1)
    pick = first.to(torch.int64).argmax(1)
    rows = torch.arange(n)
    h_pick, w_pick = h[rows, pick], w[rows, pick]
    # fallback (get_params after the loop): ratio = width / height, clamped into [min, max]
    h0, w0 = h_img[:, 0], w_img[:, 0]
    in_ratio = w0 / h0
    lo, hi = min(ratio), max(ratio)
    w_fb = torch.where(in_ratio < lo, w0, torch.where(in_ratio > hi, torch.round(h0 * hi), w0))
    h_fb = torch.where(in_ratio < lo, torch.round(w0 / lo), h0)
    h_out = torch.where(found, h_pick, h_fb)
    w_out = torch.where(found, w_pick, w_fb)
    # offsets: randint(0, H - h + 1) in the loop; centred ((H - h) // 2) for the fallback
    top_rand = torch.floor(torch.rand(n, dtype=torch.float64) * (h0 - h_out + 1)).clamp(max=h0 - h_out)
    left_rand = torch.floor(torch.rand(n, dtype=torch.float64) * (w0 - w_out + 1)).clamp(max=w0 - w_out)
    top = torch.where(found, top_rand, torch.div(h0 - h_out, 2, rounding_mode="floor"))
    left = torch.where(found, left_rand, torch.div(w0 - w_out, 2, rounding_mode="floor"))
    return torch.stack([top, left, h_out, w_out], dim=1).to(torch.int64)


def normalised_boxes(crops: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                     convention: str) -> torch.Tensor:
    """(N, 4) float (x1, y1, x2, y2) of (top, left, height, width) crops, as data/views.py ``crop_box``."""
    if convention not in BOX_CONVENTIONS:
        raise ConfigError(f"box_convention={convention!r}: choose one of {list(BOX_CONVENTIONS)}")
    top, left, h, w = (crops[:, k].to(torch.float64) for k in range(4))
    height, width = heights.to(torch.float64), widths.to(torch.float64)
    if convention == "edges":
        box = [left / width, top / height, (left + w) / width, (top + h) / height]
    else:  # pixel_index: RandomResizedCropCoord, float(j) / (width - 1), ...
        box = [left / (width - 1), top / (height - 1), (left + w - 1) / (width - 1), (top + h - 1) / (height - 1)]
    return torch.stack(box, dim=1).to(torch.float32)


def resized_crops(images: list[torch.Tensor], image_index: torch.Tensor, crops: torch.Tensor,
                  size: int) -> torch.Tensor:
    """(N, 3, size, size) float crops in [0, 255]: crop k is ``crops[k]`` (top, left, h, w) of
    ``images[image_index[k]]``. One ``roi_align`` call per distinct image size (the images of one size are
    stacked; a batch of one size is one call)."""
    device = images[0].device
    out = torch.empty(len(crops), 3, size, size, device=device, dtype=torch.float32)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[tuple(image.shape)].append(i)
    owner = image_index.tolist()
    for members in by_shape.values():
        position = {image: p for p, image in enumerate(members)}
        rows = [k for k, image in enumerate(owner) if image in position]
        if not rows:
            continue
        stack = torch.stack([images[i] for i in members]).to(torch.float32)
        c = crops[rows].to(torch.float32)
        local = torch.tensor([position[owner[k]] for k in rows], dtype=torch.float32)
        rois = torch.stack([local, c[:, 1], c[:, 0], c[:, 1] + c[:, 3], c[:, 0] + c[:, 2]], dim=1)
        out[torch.tensor(rows, device=device)] = roi_align(stack, rois.to(device), output_size=(size, size),
                                                           spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out


def blur_kernel_size(max_sigma: float) -> int:
    """Odd kernel covering ±3σ of the widest blur drawn (PIL's GaussianBlur has no fixed kernel)."""
    return 2 * math.ceil(3 * max_sigma) + 1


class DeviceMultiCrop(nn.Module):
    """``MultiCropViews`` for a batch of (3, H, W) uint8 images on one device; see the module docstring."""

    def __init__(self, views: MultiCropViews):
        super().__init__()
        if not isinstance(views, MultiCropViews):
            raise ConfigError(f"the device data path builds MultiCropViews (data/views.py), got "
                              f"{type(views).__name__}; train this method with data_path: cpu")
        self.specs: list[CropSpec] = list(views.crops)
        self.box_convention = views.box_convention
        c = views.color
        self.pipelines = nn.ModuleList(self._pipeline(spec, c) for spec in self.specs)

    @staticmethod
    def _pipeline(spec: CropSpec, c: Any) -> nn.ModuleList:
        """The CPU path's order: flip → jitter (p) → grayscale (p) → blur (p) → solarize (p) → normalise."""
        steps: list[nn.Module] = [K.RandomHorizontalFlip(p=c.flip_prob),
                                  K.ColorJitter(*c.jitter, p=c.jitter_prob),
                                  K.RandomGrayscale(p=c.grayscale_prob)]
        if spec.blur_prob > 0:
            steps.append(K.RandomGaussianBlur(blur_kernel_size(max(c.blur_radius)), sigma=tuple(c.blur_radius),
                                              border_type="replicate", p=spec.blur_prob))
        if spec.solarize_prob > 0:
            steps.append(K.RandomSolarize(thresholds=(SOLARIZE_THRESHOLD, SOLARIZE_THRESHOLD),
                                          additions=(0.0, 0.0), p=spec.solarize_prob))
        steps.append(K.Normalize(mean=torch.tensor(c.mean), std=torch.tensor(c.std)))
        return nn.ModuleList(steps)

    @property
    def num_crops(self) -> int:
        return sum(spec.count for spec in self.specs)

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> dict[str, Any]:
        if not images:
            raise ConfigError("the device data path got an empty batch")
        batch = len(images)
        device = images[0].device
        heights = torch.tensor([int(t.shape[-2]) for t in images])
        widths = torch.tensor([int(t.shape[-1]) for t in images])
        crops: list[torch.Tensor] = []
        boxes: list[torch.Tensor] = []
        flips: list[torch.Tensor] = []
        for spec, pipeline in zip(self.specs, self.pipelines):
            owner = torch.arange(batch).repeat(spec.count)  # copy-major: rows [j·B, (j+1)·B) are copy j
            pixel_boxes = sample_resized_crops(heights[owner], widths[owner], tuple(spec.scale))
            x = resized_crops(images, owner, pixel_boxes, spec.size).div_(255.0)
            flip = pipeline[0]
            x = flip(x)
            flipped = flip._params["batch_prob"].to(torch.bool).reshape(-1).cpu()
            for step in pipeline[1:]:
                x = step(x)
            crops.extend(x.chunk(spec.count))
            boxes.append(normalised_boxes(pixel_boxes, heights[owner], widths[owner], self.box_convention)
                         .reshape(spec.count, batch, 4))
            flips.append(flipped.reshape(spec.count, batch))
        return {"crops": crops,
                "boxes": torch.cat(boxes).transpose(0, 1).contiguous().to(device),
                "flips": torch.cat(flips).transpose(0, 1).contiguous().to(device)}
