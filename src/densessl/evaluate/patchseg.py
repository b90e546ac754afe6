"""Patch-Seg probing: patch-level semantic labels predicted from frozen backbone tokens.

Follows iancovert/patch-seg @ fc14f36 (reference/protocols/patchseg.md): largest centred square crop,
resize to the backbone's native size (bilinear image, nearest mask), backbone mean/std; the mask is reduced
to one label set per patch (``union`` / ``majority``) or per image (``global-union``); a small head
(``linear`` / ``mlp`` / ``transformer``) is trained with AdamW + timm's cosine schedule (per update, linear
warm-up from 0) and validated every epoch; the epoch with the best validation macro recall is reported.

Two deliberate additions, neither of which changes the official numbers when left at their defaults:

* ``cache_features`` (default on): the official probe has no data augmentation (``LargestCenterCrop`` +
  ``Resize`` + ``Normalize``, deterministic) and the backbone is frozen, so the backbone output for an image
  is the same every epoch. We compute it once per split and keep it in memory when it fits
  (``feature_cache_max_gb``); every epoch then costs only the head. The official code runs the backbone in
  ``train()`` mode while training and ``eval()`` mode while validating; we extract train features in
  ``train()`` mode and val features in ``eval()`` mode, which is identical for a ViT without dropout /
  drop-path. If the backbone has layers that behave randomly or batch-dependently in ``train()`` mode
  (dropout or drop-path with p > 0, BatchNorm), the train split is streamed instead so the result stays
  exact. With ``precision='bf16'`` the cache is stored in bfloat16, which is the dtype the head's first
  Linear sees under autocast anyway (for the transformer head its input LayerNorm sees rounded inputs).
* ``class_balanced`` (default off): design.md ("Smoke scale") measured that on smoke data, where ~75 % of
  patches are background, a plain probe predicts background everywhere. The official loss is plain
  BCE / CE and stays the default; ``class_balanced=True`` weights positives of class c by
  ``neg_c / pos_c`` (``pos_weight`` in BCE) or, for majority, class c by ``N / (K n_c)`` in CE, both
  counted on the training targets and clipped at ``class_balance_max_weight``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from densessl.data.ade20k import ADE_NUM_CLASSES_WITH_OTHER, ADE20KSegmentation
from densessl.data.coco import COCO_NUM_CLASSES, CocoStuffPatchSegDataset, PairedSegmentationFolder
from densessl.errors import ConfigError, DataError
from densessl.evaluate.feature_stats import effective_rank
from densessl.evaluate.metrics import MulticlassConfusion, MultilabelConfusion
from densessl.io import write_json
from densessl.models.backbones import backbone_info

DATASETS = ("coco", "ade20k")
LABEL_REDUCTIONS = ("union", "majority", "global-union")
HEADS = ("linear", "mlp", "transformer")
PRECISIONS = ("bf16", "fp32")


@dataclass
class PatchSegConfig:
    """Defaults are the official ``scripts/train.py`` defaults (reference/protocols/patchseg.md "Schedule")."""

    dataset: str = "coco"  # --dataset coco | ade20k
    label_reduction: str = "union"  # --label-reduction (official default union)
    head: str = "transformer"  # --output-head (official default transformer)
    hidden_size: int = 1024  # --hidden-size (mlp head)
    num_layers: int = 2  # --num-layers (transformer head)
    batch_size: int = 32  # --batch-size
    epochs: int = 5  # --num-epochs
    lr: float = 1e-3  # --lr
    min_lr: float = 1e-4  # --min-lr
    weight_decay: float = 0.01  # --weight-decay
    warmup_steps: int = 500  # --warmup-steps
    seed: int = 0  # --seed
    num_workers: int = 0  # data loader workers (official 24; a smoke run needs none)
    max_train_items: int | None = None  # first N sorted training images (smoke runs)
    max_val_items: int | None = None
    class_balanced: bool = False  # not official: see module docstring
    class_balance_max_weight: float = 1000.0  # clip for class_balanced weights (rare classes)
    precision: str = "bf16"  # --dtype bfloat16; autocast only on CUDA, fp32 elsewhere
    cache_features: bool = True  # precompute frozen-backbone tokens once (see module docstring)
    feature_cache_max_gb: float = 48.0  # stream instead when a split's tokens would exceed this
    threshold: float = 0.5  # detection threshold of the union metrics (official 0.5)

    def validate(self) -> None:
        for name, value, allowed in (("dataset", self.dataset, DATASETS),
                                     ("label_reduction", self.label_reduction, LABEL_REDUCTIONS),
                                     ("head", self.head, HEADS), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ConfigError(f"patchseg config: {name}={value!r} is not one of {list(allowed)}")
        for name in ("batch_size", "epochs", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"patchseg config: {name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("patchseg config: warmup_steps and num_workers must be >= 0")


# ----------------------------------------------------------------------------------------------------------
# Preprocessing and label reduction
# ----------------------------------------------------------------------------------------------------------

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


def open_split(cfg: PatchSegConfig, data_root: Path, split: str) -> tuple[PairedSegmentationFolder, int]:
    limit = cfg.max_train_items if split == "train" else cfg.max_val_items
    if cfg.dataset == "coco":
        return CocoStuffPatchSegDataset(data_root, split, max_items=limit), COCO_NUM_CLASSES
    return ADE20KSegmentation(data_root, split, max_items=limit), ADE_NUM_CLASSES_WITH_OTHER


# ----------------------------------------------------------------------------------------------------------
# Features and heads
# ----------------------------------------------------------------------------------------------------------

def feature_mode(head: str, reduction: str, num_prefix_tokens: int) -> str:
    """Which tokens the backbone hands to the head (official ``prepare_backbone``)."""
    if head in ("linear", "mlp"):
        if reduction == "global-union":
            return "keep_prefix" if num_prefix_tokens > 0 else "mean"
        return "keep_suffix"
    return "keep_all"


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


class MLPHead(nn.Module):
    """Official ``MLP``: Linear - GELU - Linear per token."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(x)))


class TransformerHead(nn.Module):
    """Official ``Transformer`` head: learned PE N(0, 0.02) over all tokens, LN, timm Blocks (qkv_bias
    False, LayerScale 0.01, mlp_ratio 4, no dropout), LN, Linear; output patch tokens (``keep_suffix``),
    the prefix mean (``keep_prefix``) or the token mean (``mean``)."""

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int, num_tokens: int,
                 num_prefix_tokens: int, mode: str, num_layers: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.mode = mode
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, embed_dim) * 0.02)
        self.norm_pre = nn.LayerNorm(embed_dim)
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=4, qkv_bias=False, qk_norm=False,
                  init_values=0.01, proj_drop=0.0, attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm,
                  act_layer=nn.GELU, mlp_layer=Mlp)
            for _ in range(num_layers)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.norm(self.blocks(self.norm_pre(x + self.pos_embed))))
        if self.mode == "keep_suffix":
            return x[:, self.num_prefix_tokens:]
        if self.mode == "keep_prefix":
            return x[:, : self.num_prefix_tokens].mean(dim=1, keepdim=True)
        return x.mean(dim=1, keepdim=True)


def build_head(cfg: PatchSegConfig, embed_dim: int, num_heads: int, num_prefix_tokens: int, num_patches: int,
               num_classes: int) -> nn.Module:
    if cfg.head == "linear":
        return nn.Linear(embed_dim, num_classes)
    if cfg.head == "mlp":
        return MLPHead(embed_dim, cfg.hidden_size, num_classes)
    if cfg.label_reduction == "global-union":
        mode = "keep_prefix" if num_prefix_tokens > 0 else "mean"
    else:
        mode = "keep_suffix"
    return TransformerHead(embed_dim, num_heads, num_classes, num_patches + num_prefix_tokens,
                           num_prefix_tokens, mode, cfg.num_layers)


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
                 cache_dtype: torch.dtype, desc: str) -> None:
        self.data = data
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
        with torch.no_grad(), self.autocast():
            return extract_features(self.backbone, images.to(self.device, non_blocking=True), self.mode)

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(self.data, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _fill_cache(self, dtype: torch.dtype) -> None:
        n = len(self.data)
        order = list(range(n))
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        pos = 0
        for images, targets in tqdm(self._loader(batches), desc=f"{self.desc} features", disable=None,
                                    leave=False):
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


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------

def class_weights(source: FeatureSource, reduction: str, num_classes: int, max_weight: float) -> torch.Tensor:
    """``pos_weight`` (BCE: neg_c / pos_c) or CE weights (N / (K n_c)) from the training targets."""
    pos = torch.zeros(num_classes, dtype=torch.float64)
    total = 0
    for targets in source.all_targets():
        if reduction == "majority":
            pos += torch.bincount(targets.reshape(-1).long(), minlength=num_classes).double()
            total += targets.numel()
        else:
            flat = targets.reshape(-1, num_classes)
            pos += flat.double().sum(0)
            total += flat.shape[0]
    w = torch.ones(num_classes, dtype=torch.float64)
    seen = pos > 0
    if reduction == "majority":
        w[seen] = total / (int(seen.sum()) * pos[seen])
    else:
        w[seen] = (total - pos[seen]) / pos[seen]
    return w.clamp(max=max_weight).float()


def patchseg_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str,
                  weight: torch.Tensor | None) -> torch.Tensor:
    """Official ``UnionLoss`` / ``MajorityLoss`` / ``GlobalUnionLoss`` (+ optional class weights)."""
    c = logits.shape[-1]
    if reduction == "majority":
        return F.cross_entropy(logits.reshape(-1, c), targets.reshape(-1).long(), weight=weight)
    if reduction == "global-union":
        logits = logits[:, 0]
    return F.binary_cross_entropy_with_logits(logits.reshape(-1, c), targets.reshape(-1, c).to(logits.dtype),
                                              pos_weight=weight)


# ----------------------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _scalar_metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "per_class"}


def _per_class_lists(m: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: np.asarray(v).tolist() for k, v in m["per_class"].items()}



def evaluate_head(head: nn.Module, source: FeatureSource, cfg: PatchSegConfig, num_classes: int,
                  weight: torch.Tensor | None, autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, Any]:
    """Validation loss (mean over images) and Patch-Seg metrics over every validation patch."""
    head.eval()
    meter = MulticlassConfusion(num_classes) if cfg.label_reduction == "majority" else \
        MultilabelConfusion(num_classes, cfg.threshold)
    n = len(source.data)
    batches = [list(range(i, min(n, i + cfg.batch_size))) for i in range(0, n, cfg.batch_size)]
    total_loss, total = 0.0, 0
    with torch.no_grad():
        for feats, targets in source.iterate(batches):
            with autocast():
                logits = head(feats)
                loss = patchseg_loss(logits, targets, cfg.label_reduction, weight)
            if cfg.label_reduction == "global-union":
                meter.update(logits[:, 0], targets)
            else:
                meter.update(logits, targets)
            total_loss += loss.item() * len(feats)
            total += len(feats)
    out = meter.compute()
    out["loss"] = total_loss / max(total, 1)
    return out


def run_patchseg(backbone: nn.Module, data_root: Path, cfg: PatchSegConfig, out_dir: Path | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Train and validate a Patch-Seg head on the frozen ``backbone``; return (and write) the metrics.

    The returned dict holds the official CSV row fields of the best epoch (by validation macro recall:
    ``dataset, label_reduction, output_head, num_epochs, loss, accuracy, macro_accuracy, macro_recall,
    macro_precision, macro_f1``), the NaN-aware ``macro_precision_nanmean`` / ``macro_f1_nanmean``,
    ``best_epoch`` (0-based), ``epochs`` (per-epoch train loss, lr and validation metrics), ``per_class``
    (best epoch) and run facts. With ``out_dir`` it is also written to ``out_dir/metrics.json`` (NaN as null).
    """
    cfg.validate()
    t0 = time.time()
    data_root = Path(data_root)
    dev = torch.device(device)
    _seed_everything(cfg.seed)

    info = backbone_info(backbone)
    # The caller's module is used in place (no copy: ViT-H is large); its flags are restored on exit.
    was_training = backbone.training
    grad_flags = [p.requires_grad for p in backbone.parameters()]
    backbone.to(dev)
    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        return _run(backbone, data_root, cfg, out_dir, dev, info, t0)
    finally:
        backbone.train(was_training)
        for p, flag in zip(backbone.parameters(), grad_flags):
            p.requires_grad_(flag)


def _run(backbone: nn.Module, data_root: Path, cfg: PatchSegConfig, out_dir: Path | None, dev: torch.device,
         info: Any, t0: float) -> dict[str, Any]:
    """The body of :func:`run_patchseg` once the backbone is frozen."""
    img_size, patch = info.img_size, info.patch_size
    grid = img_size // patch
    num_patches = grid * grid
    mode = feature_mode(cfg.head, cfg.label_reduction, info.num_prefix_tokens)
    use_bf16 = cfg.precision == "bf16" and dev.type == "cuda"

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    cache_dtype = torch.bfloat16 if use_bf16 else torch.float32

    sources: dict[str, FeatureSource] = {}
    cache_used: dict[str, bool] = {}
    num_classes = 0
    for split in ("train", "val"):
        reader, num_classes = open_split(cfg, data_root, split)
        data = PatchSegData(reader, num_classes, img_size, patch, info.mean, info.std, cfg.label_reduction)
        train_mode = split == "train"  # official: backbone.train() while training, .eval() in evaluate()
        if train_mode and len(data) < cfg.batch_size:  # checked before any feature extraction
            raise ConfigError(f"patchseg: {len(data)} training images < batch_size {cfg.batch_size}; lower "
                              f"batch_size or raise max_train_items")
        nbytes = estimate_cache_bytes(len(data), mode, num_patches, info.num_prefix_tokens, info.embed_dim,
                                      cache_dtype, cfg.label_reduction, num_classes)
        cache = (cfg.cache_features and nbytes <= cfg.feature_cache_max_gb * 2**30
                 and not (train_mode and _train_mode_is_stochastic(backbone)))
        sources[split] = FeatureSource(data, backbone, mode, train_mode, dev, autocast, cfg.batch_size,
                                       cfg.num_workers, cache, cache_dtype, split)
        cache_used[split] = sources[split].cached

    n_train = len(sources["train"].data)
    steps_per_epoch = n_train // cfg.batch_size  # drop_last=True
    total_steps = cfg.epochs * steps_per_epoch

    torch.manual_seed(cfg.seed)
    head = build_head(cfg, info.embed_dim, info.num_heads, info.num_prefix_tokens, num_patches,
                      num_classes).to(dev)
    weight = None
    if cfg.class_balanced:
        weight = class_weights(sources["train"], cfg.label_reduction, num_classes,
                               cfg.class_balance_max_weight).to(dev)

    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr, t_in_epochs=False,
                                  warmup_t=cfg.warmup_steps)  # warmup_lr_init=0: warm-up from 0
    shuffle = torch.Generator().manual_seed(cfg.seed)

    epochs: list[dict[str, Any]] = []
    best_epoch, best_recall, best_full = -1, float("-inf"), None
    num_updates = 0
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(n_train, generator=shuffle).tolist()
        batches = [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
        running, seen = 0.0, 0
        bar = tqdm(sources["train"].iterate(batches), total=steps_per_epoch, disable=None, leave=False,
                   desc=f"patchseg epoch {epoch + 1}/{cfg.epochs}")
        for feats, targets in bar:
            with autocast():
                logits = head(feats)
                loss = patchseg_loss(logits, targets, cfg.label_reduction, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            running += loss.item()
            seen += 1
            bar.set_postfix(loss=f"{running / seen:.4f}")
        val = evaluate_head(head, sources["val"], cfg, num_classes, weight, autocast)
        epochs.append({"epoch": epoch, "train_loss": running / max(seen, 1),
                       "lr": float(optimizer.param_groups[0]["lr"]), "val": _scalar_metrics(val)})
        if val["macro_recall"] > best_recall:  # strict, as official: the first best epoch wins; NaN never wins
            best_epoch, best_recall, best_full = epoch, val["macro_recall"], val
    if best_full is None:  # every epoch NaN (no valid class): report the last one
        best_epoch, best_full = cfg.epochs - 1, val

    best = _scalar_metrics(best_full)
    # Diagnostic, not a score: the effective rank of the validation patch tokens (prefix tokens dropped), from
    # the cache; None when the split was streamed (the features are never all in memory then).
    val_features = sources["val"].features
    if val_features is not None and mode == "keep_all":
        val_features = val_features[:, info.num_prefix_tokens:]
    feature_rank = None if val_features is None else effective_rank(val_features)
    result: dict[str, Any] = {
        "protocol": "patchseg",
        "dataset": cfg.dataset,
        "label_reduction": cfg.label_reduction,
        "output_head": cfg.head,
        "num_epochs": cfg.epochs,
        "loss": best["loss"],
        "accuracy": best["accuracy"],
        "macro_accuracy": best["macro_accuracy"],
        "macro_recall": best["macro_recall"],
        "macro_precision": best["macro_precision"],
        "macro_f1": best["macro_f1"],
        "macro_precision_nanmean": best["macro_precision_nanmean"],
        "macro_f1_nanmean": best["macro_f1_nanmean"],
        "num_valid_classes": best["num_valid_classes"],
        "feature_effective_rank": feature_rank,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "per_class": _per_class_lists(best_full),
        "num_classes": num_classes,
        "num_train": n_train,
        "num_val": len(sources["val"].data),
        "img_size": img_size,
        "mean": list(info.mean),  # the normalisation used: the backbone's own (timm pretrained_cfg) or ImageNet
        "std": list(info.std),
        "patch_size": patch,
        "grid_size": grid,
        "feature_mode": mode,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "feature_cache": cache_used,
        "class_weights": None if weight is None else weight.cpu().tolist(),
        "device": str(dev),
        "autocast_bf16": use_bf16,
        "config": asdict(cfg),
        "wall_time_s": time.time() - t0,
    }
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    return result
