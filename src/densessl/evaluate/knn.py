"""ImageNet weighted k-NN classification on frozen features, as DINO's ``eval_knn.py``.

Official repository facebookresearch/dino @ 7c446df, ``eval_knn.py``: features of the train and val splits
(``imagenet_features.global_feature``) are L2-normalised; for each val image the ``k`` train images of highest
cosine similarity vote for their class with weight ``exp(sim / T)`` (``T = --temperature`` 0.07); the class
with the largest summed weight is the prediction; top-1 / top-5 in percent. ``--nb_knn`` defaults to
[10, 20, 100, 200] and the script prints all four; the README reports 20-NN, so ``knn_top1`` is the 20-NN
top-1 and the others are kept as ``top1_k{k}`` / ``top5_k{k}``.

Two details differ from the script without changing a number: the script chunks the val set into
``n // 100`` images (0 and a crash below 100 images), we use fixed chunks (votes are per image); it sizes the
vote with ``num_classes=1000``, we use the split's class count (the extra columns are all zero).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from densessl.data.imagenet import LabelledImageFolder
from densessl.errors import ConfigError
from densessl.evaluate.imagenet_features import TransformedPairs, eval_sizes, eval_transform, global_feature
from densessl.evaluate.knn_config import KnnConfig
from densessl.io import write_json
from densessl.models.backbones import backbone_info
from densessl.progress import track


@torch.no_grad()
def extract(backbone: nn.Module, data: Dataset, batch_size: int, num_workers: int, device: torch.device,
            desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on ``device``, labels (N,)) in dataset order, backbone in eval mode."""
    backbone.eval()
    feats, labels = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for images, target in track(loader, desc, unit="batch", items_of=lambda b: len(b[1]), bar=True):
        feats.append(global_feature(backbone, images.to(device, non_blocking=True)).float())
        labels.append(target.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, temperature: float, num_classes: int,
                   chunk: int = 256) -> tuple[float, float]:
    """``eval_knn.knn_classifier`` on L2-normalised features -> (top-1, top-5) in percent.

    ``k`` larger than the train set is clipped to it (the official ``topk`` would raise)."""
    k = min(k, train_features.shape[0])
    top1 = top5 = 0
    bank = train_features.t()
    for start in range(0, test_labels.shape[0], chunk):
        feats = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk]
        sims, idx = (feats @ bank).topk(k, largest=True, sorted=True)
        neighbours = train_labels[idx]  # (b, k)
        one_hot = F.one_hot(neighbours, num_classes).to(sims.dtype)
        probs = (one_hot * (sims / temperature).exp().unsqueeze(-1)).sum(1)
        predictions = probs.argsort(dim=1, descending=True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, :min(5, k)].sum())
    total = test_labels.shape[0]
    return top1 * 100.0 / total, top5 * 100.0 / total


def run_knn(backbone: nn.Module, data_root: Path, cfg: KnnConfig, out_dir: Path | None = None,
            device: str = "cpu") -> dict[str, Any]:
    """Weighted k-NN top-1/top-5 of ``backbone``'s global feature on an ImageFolder ImageNet (train → val).

    ``knn_top1`` / ``knn_top5`` are the ``report_k``-NN values (the DINO README's column); ``top1_k{k}`` /
    ``top5_k{k}`` every k of ``nb_knn``. With ``out_dir`` the dict is also written to ``out_dir/metrics.json``.
    """
    cfg.validate()
    t0 = time.time()
    dev = torch.device(device)
    info = backbone_info(backbone)
    resize, crop = eval_sizes(cfg.crop_size, cfg.resize_size, info.img_size)
    transform = eval_transform(resize, crop, info.mean, info.std)
    train = LabelledImageFolder(data_root, "train", cfg.max_train_items)
    val = LabelledImageFolder(data_root, "val", cfg.max_val_items)
    if train.classes != val.classes:
        raise ConfigError(f"{Path(data_root) / 'val'}: class folders differ from train's; both splits need the "
                          f"same <wnid> folders (ImageFolder labels are their sorted positions)")
    was_training = backbone.training
    backbone.to(dev)
    try:
        train_f, train_y = extract(backbone, TransformedPairs(train, transform), cfg.batch_size, cfg.num_workers,
                                   dev, "knn train features")
        val_f, val_y = extract(backbone, TransformedPairs(val, transform), cfg.batch_size, cfg.num_workers, dev,
                               "knn val features")
    finally:
        backbone.train(was_training)
    train_f, val_f = F.normalize(train_f, dim=1, p=2), F.normalize(val_f, dim=1, p=2)
    result: dict[str, Any] = {"protocol": "knn_imagenet"}
    for k in cfg.nb_knn:
        top1, top5 = knn_classifier(train_f, train_y, val_f, val_y, k, cfg.temperature, train.num_classes)
        result[f"top1_k{k}"], result[f"top5_k{k}"] = top1, top5
    result.update({
        "knn_top1": result[f"top1_k{cfg.report_k}"], "knn_top5": result[f"top5_k{cfg.report_k}"],
        "k": cfg.report_k, "num_classes": train.num_classes, "num_train": len(train), "num_val": len(val),
        "feature_dim": int(train_f.shape[1]), "resize_size": resize, "crop_size": crop,
        "device": str(dev), "config": asdict(cfg), "wall_time_s": time.time() - t0,
    })
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    return result
