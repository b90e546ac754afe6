"""Encoded images for the device data path: DataLoader workers read bytes, the training process decodes.

Decoding is the largest CPU cost of a pretraining step's data (a 500×375 JPEG takes longer to decode than to
crop), so with ``train.data_path: device`` the workers only read each file's bytes and
``torchvision.io.decode_jpeg`` decodes the whole batch at once on the training device (nvJPEG on CUDA, libjpeg
on the CPU). A file that is not a JPEG (ImageNet's train split has a PNG and CMYK files among its ``.JPEG``s)
or an in-memory PIL image is decoded in the worker as the CPU path does (``Image.convert("RGB")``) and travels as
pixels; a JPEG that the batch decoder rejects is decoded on its own on the CPU (:func:`decode_images`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from densessl.errors import DataError

JPEG_MAGIC = b"\xff\xd8\xff"


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 RGB pixels of a PIL image, converted as ``ImageFolderImages`` does."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class EncodedImages(Dataset):
    """Item ``i`` of ``base`` as ``{"index": i, "epoch": e, "image": tensor}``: the file's JPEG bytes (1-D
    uint8) when ``base`` reads files (``paths``, as ``ImageFolderImages``/``FlatImageFolder``) and the file is a
    JPEG, else (3, H, W) uint8 pixels of the PIL image ``base[i]`` returns. Indexed by ``i`` or by the
    (epoch, i) pairs of ``EpochPermutationSampler(with_epoch=True)``; ``e`` is then carried along (else 0)."""

    def __init__(self, base: Dataset):
        self.base = base
        self.paths: list[Path] | None = getattr(base, "paths", None)
        if self.paths is not None and len(self.paths) != len(base):  # type: ignore[arg-type]
            self.paths = None  # a dataset whose items are not its paths one to one: ask it for images

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the epoch comes with each (epoch, index) pair (the trainer's interface)."""

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self._read(index)
        return {"index": index, "epoch": epoch, "image": item}

    def _read(self, index: int) -> torch.Tensor:
        if self.paths is not None:
            path = Path(self.paths[index])
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"{path}: cannot read image ({exc})") from exc
            if data[:3] == JPEG_MAGIC:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        item = self.base[index]
        if not isinstance(item, Image.Image):
            raise DataError(f"data_path: device needs a dataset of images; item {index} of "
                            f"{type(self.base).__name__} is a {type(item).__name__} (image-label pairs train "
                            f"with data_path: cpu)")
        return pil_to_uint8(item)


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`EncodedImages` items: indices and epochs as tensors, images as a list (their sizes
    differ)."""
    return {"index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            "epoch": torch.tensor([int(item["epoch"]) for item in items], dtype=torch.long),
            "images": [item["image"] for item in items]}


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # e.g. a CMYK or unusual JPEG that nvJPEG refuses: libjpeg on the CPU
        return decode_image(data.cpu(), mode=ImageReadMode.RGB).to(device, non_blocking=True)


def decode_images(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB images on ``device``: the JPEG byte tensors decoded in one batched call, pixel
    tensors moved there. Decoded with ``ImageReadMode.RGB`` (grayscale JPEGs → 3 equal channels, as PIL's
    ``convert("RGB")``) and without EXIF rotation, as PIL's ``Image.open`` reads them for the CPU path."""
    out: list[torch.Tensor | None] = [None] * len(images)
    encoded = [i for i, t in enumerate(images) if t.ndim == 1]
    for i, t in enumerate(images):
        if t.ndim == 3:
            out[i] = t.to(device, non_blocking=True)
        elif t.ndim != 1:
            raise DataError(f"image {i} of the batch has shape {tuple(t.shape)}; expected JPEG bytes (1-D) or "
                            f"(3, H, W) pixels")
    if encoded:
        data = [images[i] if images[i].device.type == "cpu" else images[i].cpu() for i in encoded]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(t, device) for t in data]
        for i, image in zip(encoded, decoded):
            out[i] = image
    return out  # type: ignore[return-value]
