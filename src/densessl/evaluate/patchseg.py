"""Patch-Seg probing: patch-level semantic labels predicted from frozen backbone tokens.

Follows iancovert/patch-seg @ fc14f36 (benchmark of arXiv 2410.11087): largest centred square crop,
resize to the backbone's native size (bilinear image, nearest mask), backbone mean/std; the mask is reduced
to one label set per patch (``union`` / ``majority``) or per image (``global-union``); a small head
(``linear`` / ``mlp`` / ``transformer``, and for ``union`` the intervention heads ``transformer-cls`` /
``transformer-separate``: patchseg_heads.py) is trained with AdamW + timm's cosine schedule (per update, linear
warm-up from 0) and validated every epoch; the epoch with the best validation macro recall is reported.

Also official, off by default as in ``scripts/train.py``: ``class_set='things'`` (``CocoPatchDataset``'s
option, not on the official CLI: stuff folded into unlabelled, 92 classes; the ``patchseg_coco_things``
protocol), ``skip_blocks`` (``--skip-blocks k``: timm ``prune_intermediate_layers`` keeps the first L - k
blocks and the final norm) and ``full_finetune`` (``--full-finetune``: backbone and head trained together by
the same AdamW, the backbone in ``train()`` mode). For union targets the validation also reports the
size-stratified metrics of the official ``SizeUnionMetricsHelper`` (``size_stratified``, metrics.py) at the
best epoch. ``csv_row`` gives the official ``results/outputs-{dataset}.csv`` line (the evaluate stage writes it).

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
* ``class_balanced`` (default off): on smoke data, where ~75 % of patches are background, a plain probe
  predicts background everywhere (docs/learning_signal.md). The official loss is plain
  BCE / CE and stays the default; ``class_balanced=True`` weights positives of class c by
  ``neg_c / pos_c`` (``pos_weight`` in BCE) or, for majority, class c by ``N / (K n_c)`` in CE, both
  counted on the training targets and clipped at ``class_balance_max_weight``.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from densessl.data.coco import PairedSegmentationFolder
from densessl.errors import ConfigError
from densessl.evaluate.feature_stats import effective_rank
from densessl.evaluate.metrics import MulticlassConfusion, MultilabelConfusion, SizeUnionConfusion
from densessl.evaluate.patchseg_config import (  # noqa: F401  (re-exported)
    DATASETS,
    HEADS,
    LABEL_REDUCTIONS,
    PRECISIONS,
    UNION_ONLY_HEADS,
    PatchSegConfig,
    check_head,
)
from densessl.evaluate.patchseg_data import (  # noqa: F401  (re-exported: the probe's public names)
    PatchSegData,
    largest_center_crop_box,
    open_patchseg_split,
    preprocess_image,
    preprocess_labels,
    reduce_labels,
)
from densessl.evaluate.patchseg_features import (  # noqa: F401
    FeatureSource,
    _train_mode_is_stochastic,
    estimate_cache_bytes,
    extract_features,
    prune_blocks,
)
from densessl.evaluate.patchseg_heads import (  # noqa: F401
    MLPHead,
    TransformerHead,
    TransformerIntervention,
    build_head,
    feature_mode,
)
from densessl.evaluate.patchseg_loss import class_weights, patchseg_loss  # noqa: F401
from densessl.evaluate.patchseg_results import CSV_COLUMNS, csv_header, csv_row  # noqa: F401
from densessl.io import write_json
from densessl.models.backbones import backbone_info
from densessl.progress import Progress, track


def open_split(cfg: PatchSegConfig, data_root: Path, split: str) -> tuple[PairedSegmentationFolder, int]:
    limit = cfg.max_train_items if split == "train" else cfg.max_val_items
    return open_patchseg_split(cfg.dataset, cfg.class_set, data_root, split, limit)


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
    return {k: v for k, v in m.items() if k not in ("per_class", "size_stratified")}


def _per_class_lists(m: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: np.asarray(v).tolist() for k, v in m["per_class"].items()}


def evaluate_head(head: nn.Module, source: FeatureSource, cfg: PatchSegConfig, num_classes: int,
                  weight: torch.Tensor | None, autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, Any]:
    """Validation loss (mean over images) and Patch-Seg metrics over every validation patch."""
    head.eval()
    meter = MulticlassConfusion(num_classes) if cfg.label_reduction == "majority" else \
        MultilabelConfusion(num_classes, cfg.threshold)
    sizes = SizeUnionConfusion(cfg.size_buckets, cfg.threshold) \
        if cfg.label_reduction == "union" and cfg.size_buckets > 0 else None
    n = len(source.data)
    batches = [list(range(i, min(n, i + cfg.batch_size))) for i in range(0, n, cfg.batch_size)]
    total_loss, total = 0.0, 0
    with torch.no_grad():
        # a streamed split runs the backbone here (a cached one is a quick pass over stored features)
        for feats, targets in track(source.iterate(batches), f"patchseg {cfg.dataset} validate", total=len(batches),
                                    unit="batch", items_of=lambda b: len(b[0]), bar=True, enabled=not source.cached):
            with autocast():
                logits = head(feats)
                loss = patchseg_loss(logits, targets, cfg.label_reduction, weight)
            if cfg.label_reduction == "global-union":
                meter.update(logits[:, 0], targets)
            else:
                meter.update(logits, targets)
            if sizes is not None:
                sizes.update(logits, targets)
            total_loss += loss.item() * len(feats)
            total += len(feats)
    out = meter.compute()
    out["loss"] = total_loss / max(total, 1)
    out["size_stratified"] = None if sizes is None else sizes.compute()
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

    if cfg.full_finetune or cfg.skip_blocks:  # both change the module: work on a copy
        backbone = prune_blocks(copy.deepcopy(backbone), cfg.skip_blocks)
    info = backbone_info(backbone)
    # Otherwise the caller's module is used in place (no copy: ViT-H is large); its flags are restored on exit.
    was_training = backbone.training
    grad_flags = [p.requires_grad for p in backbone.parameters()]
    backbone.to(dev)
    for p in backbone.parameters():
        p.requires_grad_(cfg.full_finetune)
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
        cache = (cfg.cache_features and not cfg.full_finetune and nbytes <= cfg.feature_cache_max_gb * 2**30
                 and not (train_mode and _train_mode_is_stochastic(backbone)))
        sources[split] = FeatureSource(data, backbone, mode, train_mode, dev, autocast, cfg.batch_size,
                                       cfg.num_workers, cache, cache_dtype, split,
                                       grad=cfg.full_finetune and train_mode)
        cache_used[split] = sources[split].cached

    n_train = len(sources["train"].data)
    steps_per_epoch = n_train // cfg.batch_size  # drop_last=True
    total_steps = cfg.epochs * steps_per_epoch

    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, cfg.label_reduction, info.embed_dim, info.num_heads, info.num_prefix_tokens,
                      num_patches, num_classes, cfg.hidden_size, cfg.num_layers).to(dev)
    weight = None
    if cfg.class_balanced:
        weight = class_weights(sources["train"], cfg.label_reduction, num_classes,
                               cfg.class_balance_max_weight).to(dev)

    # official: one AdamW over backbone + head parameters with --full-finetune, the head's alone otherwise
    params = [*backbone.parameters(), *head.parameters()] if cfg.full_finetune else list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr, t_in_epochs=False,
                                  warmup_t=cfg.warmup_steps)  # warmup_lr_init=0: warm-up from 0
    shuffle = torch.Generator().manual_seed(cfg.seed)

    epochs: list[dict[str, Any]] = []
    best_epoch, best_recall, best_full = -1, float("-inf"), None
    num_updates = 0
    lines = Progress(f"patchseg {cfg.dataset} train", cfg.epochs * steps_per_epoch, items_per_step=cfg.batch_size,
                     bar=True)
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(n_train, generator=shuffle).tolist()
        batches = [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
        running, seen = 0.0, 0
        for feats, targets in sources["train"].iterate(batches):
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
            lines.update(1, epoch=(epoch + 1, cfg.epochs), loss=running / seen,
                         lr=float(optimizer.param_groups[0]["lr"]))
        val = evaluate_head(head, sources["val"], cfg, num_classes, weight, autocast)
        epochs.append({"epoch": epoch, "train_loss": running / max(seen, 1),
                       "lr": float(optimizer.param_groups[0]["lr"]), "val": _scalar_metrics(val)})
        if val["macro_recall"] > best_recall:  # strict, as official: the first best epoch wins; NaN never wins
            best_epoch, best_recall, best_full = epoch, val["macro_recall"], val
    lines.finish()
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
        "size_stratified": best_full.get("size_stratified"),
        "class_set": cfg.class_set,
        "skip_blocks": cfg.skip_blocks,
        "full_finetune": cfg.full_finetune,
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
