"""Patch-Seg features: the backbone tokens a head reads (cut to its token mode), block pruning, and the batches
of features (cached once in memory, or streamed through the backbone) the probe trains on.

iancovert/patch-seg @ fc14f36: ``patchseg/vision_backbones.py`` (``modify_backbone``, ``keep_prefix``,
``keep_suffix``, ``keep_mean``). The heads and the token mode each reads are in ``patchseg_heads.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from densessl.errors import ConfigError
from densessl.evaluate.patchseg_data import PatchSegData
from densessl.models.backbones import ResNetTokens
from densessl.progress import track


def extract_features(backbone: nn.Module, images: torch.Tensor, mode: str) -> torch.Tensor:
    """``forward_features`` (tokens after the final norm) cut to ``mode`` -> (B, T, D)."""
    tokens = backbone.forward_features(images)
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    if mode == "keep_all":
        return tokens
    if mode == "keep_suffix":
        return tokens[:, prefix:]
    if mode == "keep_prefix":
        return tokens[:, :prefix].mean(dim=1, keepdim=True)
    if mode == "mean":
        return tokens.mean(dim=1, keepdim=True)
    raise ValueError(f"unknown feature mode {mode!r}")


def _train_mode_is_stochastic(module: nn.Module) -> bool:
    """True if ``train()`` mode makes the forward random or batch-dependent (caching would not be exact)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        if float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:  # timm DropPath
            return True
        if type(m).__name__ == "PatchDropout" and float(getattr(m, "prob", 0.0)) > 0:
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Batches of features: cached in memory or streamed through the backbone
# ----------------------------------------------------------------------------------------------------------

class FeatureSource:
    """Yields (features, targets) for given index batches; the same batches in cached or streamed form."""

    def __init__(self, data: PatchSegData, backbone: nn.Module, mode: str, train_mode: bool, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[Any]], batch_size: int, num_workers: int, cache: bool,
                 cache_dtype: torch.dtype, desc: str, grad: bool = False) -> None:
        self.data = data
        self.grad = grad  # full fine-tuning: the training features carry the backbone's graph (never cached)
        self.backbone = backbone
        self.mode = mode
        self.train_mode = train_mode
        self.device = device
        self.autocast = autocast
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.desc = desc
        self.features: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        if cache:
            self._fill_cache(cache_dtype)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        self.backbone.train(self.train_mode)
        with (nullcontext() if self.grad else torch.no_grad()), self.autocast():
            return extract_features(self.backbone, images.to(self.device, non_blocking=True), self.mode)

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(self.data, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _fill_cache(self, dtype: torch.dtype) -> None:
        n = len(self.data)
        order = list(range(n))
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        pos = 0
        for images, targets in track(self._loader(batches), f"{self.desc} features", unit="batch",
                                     items_of=lambda b: len(b[0]), bar=True):
            feats = self._forward(images).to("cpu", dtype)
            if self.features is None:
                self.features = torch.empty((n, *feats.shape[1:]), dtype=dtype)
                self.targets = torch.empty((n, *targets.shape[1:]), dtype=targets.dtype)
            self.features[pos:pos + len(feats)] = feats
            self.targets[pos:pos + len(feats)] = targets
            pos += len(feats)

    @property
    def cached(self) -> bool:
        return self.features is not None

    def iterate(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.features is not None and self.targets is not None:
            for b in batches:
                idx = torch.as_tensor(b, dtype=torch.long)
                yield (self.features[idx].to(self.device, non_blocking=True),
                       self.targets[idx].to(self.device, non_blocking=True))
            return
        for images, targets in self._loader(batches):
            yield self._forward(images), targets.to(self.device, non_blocking=True)

    def all_targets(self) -> Iterator[torch.Tensor]:
        """Every target once (for class statistics), without decoding images when streaming."""
        if self.targets is not None:
            yield self.targets
            return
        self.data.labels_only = True
        try:
            n = len(self.data)
            batches = [list(range(i, min(n, i + self.batch_size))) for i in range(0, n, self.batch_size)]
            for _, targets in self._loader(batches):
                yield targets
        finally:
            self.data.labels_only = False


def estimate_cache_bytes(n_items: int, mode: str, num_patches: int, num_prefix: int, dim: int,
                         dtype: torch.dtype, reduction: str, num_classes: int) -> int:
    """Host memory of a split's cached tokens plus targets (union targets are (patches x classes) bytes)."""
    tokens = {"keep_all": num_patches + num_prefix, "keep_suffix": num_patches}.get(mode, 1)
    target = {"union": num_patches * num_classes, "majority": num_patches * 8}.get(reduction, num_classes)
    return n_items * (tokens * dim * torch.empty(0, dtype=dtype).element_size() + target)


def prune_blocks(backbone: nn.Module, skip_blocks: int) -> nn.Module:
    """Official ``modify_backbone(skip_blocks=k)``: ``prune_intermediate_layers(indices=[L - 1 - k])`` keeps
    blocks 0..L-1-k and the final norm. Applied to the probe's own copy of the backbone."""
    if skip_blocks == 0:
        return backbone
    if isinstance(backbone, ResNetTokens) or not hasattr(backbone, "prune_intermediate_layers"):
        raise ConfigError(f"patchseg config: skip_blocks={skip_blocks} prunes transformer blocks; "
                          f"{type(backbone).__name__} has none (use skip_blocks: 0 for ResNets)")
    depth = len(backbone.blocks)
    if skip_blocks >= depth:
        raise ConfigError(f"patchseg config: skip_blocks={skip_blocks} must be < the backbone's {depth} blocks")
    backbone.prune_intermediate_layers(indices=[depth - 1 - skip_blocks])
    return backbone
