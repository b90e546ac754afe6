"""Deterministic, resumable data order and augmentation randomness.

Resume must continue the exact same run, so neither the order of images nor the random crops may depend on
how many DataLoader workers there are or on where the run was interrupted: the permutation is a function of
(seed, epoch), and each sample's augmentation RNGs are seeded from (seed, epoch, index). With
``with_epoch=True`` the sampler yields (epoch, index) pairs, so that DataLoader workers that outlive an epoch
(``persistent_workers``) still know which epoch an item belongs to.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochPermutationSampler(Sampler[Any]):
    """Shuffled indices for (seed, epoch), split across ranks, starting at ``start_batch`` of this epoch.

    With ``accumulation`` micro-batches per optimiser step, only whole steps are kept, and optimiser step s reads
    the images at positions [s·B, (s+1)·B) of the epoch's permutation (B = batch × world × accumulation) whatever
    the split: 8 GPUs, or 4 GPUs accumulating 2 micro-batches, train on the same images in the same steps."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accumulation: int = 1, with_epoch: bool = False):
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full (micro-)batches per rank per epoch, a whole number of optimiser steps (drop_last, as DINO's loader)."""
        steps = self.num_items // (self.batch_size * self.world_size * self.accumulation)
        return steps * self.accumulation

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_items, generator=g).tolist()
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        return perm[:usable][self.rank::self.world_size]

    def __iter__(self) -> Iterator[Any]:
        indices = self._indices()[self.start_batch * self.batch_size:]
        if self.with_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def item_seed_of(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of item ``index`` in ``epoch`` (the device data path seeds a batch by its first item)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class SeededAugmentation(Dataset):
    """Wrap a dataset of PIL images so that item ``i`` of epoch ``e`` is always augmented identically."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Any], seed: int):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        item_seed = item_seed_of(self.seed, epoch, index)
        random.seed(item_seed)
        np.random.seed(item_seed % (2**32))
        torch.manual_seed(item_seed)
        image = self.base[index]
        return self.transform(image)
