"""Where a pretraining batch's views are made: ``train.data_path``.

- ``cpu`` (the reference): each DataLoader worker decodes an image with PIL and runs the method's ``views()``
  on it (``SeededAugmentation``: item i of epoch e is augmented from seed (seed, e, i));
- ``device``: the workers read JPEG bytes only (data/jpeg_bytes.py); the training process decodes the batch
  with ``torchvision.io.decode_jpeg`` on the training device and builds the same multi-crop views there with
  kornia (data/device_views.py), seeded from (seed, e, first index of the batch), so resume repeats them too.
  For methods whose ``views()`` is a ``MultiCropViews`` (DINO, SelfPatch, CLoVE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from densessl.data.device_views import DeviceMultiCrop
from densessl.data.jpeg_bytes import EncodedImages, collate_encoded, decode_images
from densessl.data.views import MultiCropViews
from densessl.errors import ConfigError
from densessl.train.sampling import SeededAugmentation, item_seed_of

DATA_PATHS = ("cpu", "device")


class DeviceViews:
    """A batch of :class:`EncodedImages` items → the method's views on ``device`` (decode, then crop)."""

    def __init__(self, views: MultiCropViews, device: torch.device, seed: int):
        self.crop = DeviceMultiCrop(views).to(device)
        self.device = device
        self.seed = seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = decode_images(batch["images"], self.device)
        seed = item_seed_of(self.seed, int(batch["epoch"][0]), int(batch["index"][0]))
        with torch.random.fork_rng(devices=[]):  # kornia and the box sampler draw from the CPU generator
            torch.manual_seed(seed)
            return self.crop(images)


@dataclass
class DataPath:
    """What the DataLoader reads (``dataset``, ``collate_fn``) and what turns its batches into the method's."""

    name: str
    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any] | None = None
    on_batch: Callable[[Any], Any] | None = None

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        for batch in loader:
            yield batch if self.on_batch is None else self.on_batch(batch)


def build_data_path(name: str, dataset: Dataset, views: Callable[[Any], Any], seed: int,
                    device: torch.device, method: str = "") -> DataPath:
    if name == "cpu":
        return DataPath(name, SeededAugmentation(dataset, views, seed))
    if name == "device":
        if not isinstance(views, MultiCropViews):
            raise ConfigError(f"train.data_path: device builds the multi-crop views of data/views.py (DINO, "
                              f"SelfPatch, CLoVE); {method or 'this method'} makes its own "
                              f"({type(views).__name__}): set train.data_path: cpu for it")
        return DataPath(name, EncodedImages(dataset), collate_encoded, DeviceViews(views, device, seed))
    raise ConfigError(f"train.data_path: {name!r}; allowed values: {', '.join(DATA_PATHS)}")
