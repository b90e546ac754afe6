"""ImageNet linear classification on frozen features, as DINO's ``eval_linear.py``.

Official repository facebookresearch/dino @ 7c446df, ``eval_linear.py``: the backbone is frozen in ``eval()``
mode; its feature (``imagenet_features.linear_feature``: the last ``n_last_blocks`` = 4 CLS tokens for ViT-S,
``n_last_blocks 1 + avgpool_patchtokens`` for ViT-B, the pooled feature for ResNets) feeds
``LinearClassifier`` (weights N(0, 0.01), bias 0), trained with cross-entropy by SGD (momentum 0.9, no weight
decay) at ``lr * batch / 256`` (``--lr`` 0.001, linear scaling rule), ``CosineAnnealingLR(epochs,
eta_min=0)`` stepped once per epoch, 100 epochs, ``RandomResizedCrop`` + flip; validated every epoch
(``--val_freq 1``); the printed result is the **best** validation top-1 over the epochs (``best_acc``).

Resumable like the Segmenter linear decoder (``evaluate.resume``): the epoch's order is a permutation drawn
from (seed, epoch), each image's crop is drawn from (seed, epoch, index), and the state (classifier, optimizer,
epoch, batch, best accuracy, history) is saved every ``checkpoint_every`` batches, at each epoch end and on
SIGTERM/SIGUSR1, so a resumed run equals the uninterrupted one. The official loader keeps the last partial
batch (no ``drop_last``); so do we.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from densessl.data.imagenet import LabelledImageFolder
from densessl.errors import ConfigError
from densessl.evaluate.imagenet_features import (
    TransformedPairs,
    eval_sizes,
    eval_transform,
    feature_dim,
    is_resnet,
    linear_feature,
    train_transform,
)
from densessl.evaluate.linear_cls_config import LinearClsConfig
from densessl.evaluate.resume import StopSignals, TrainState, open_train_state
from densessl.io import write_json
from densessl.models.backbones import backbone_info
from densessl.progress import Progress, track
from densessl.train.sampling import SeededAugmentation


class LinearClassifier(nn.Module):
    """``eval_linear.LinearClassifier``: flatten, Linear; weight N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.size(0), -1))


def cosine_epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)`` after ``epoch`` steps (its closed form)."""
    return base * (1 + math.cos(math.pi * epoch / epochs)) / 2


class _Pairs(Dataset):
    """(PIL image, label) pairs; the transform is applied by the wrapper."""

    def __init__(self, folder: LabelledImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.folder[index], self.folder.labels[index]


class _AugmentPair:
    """(image, label) -> (transform(image), label); a class, not a lambda, so loader workers can pickle it."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, pair: tuple[Any, int]) -> tuple[torch.Tensor, int]:
        return self.transform(pair[0]), pair[1]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@torch.no_grad()
def validate_network(backbone: nn.Module, head: LinearClassifier, loader: DataLoader, n_last: int, avgpool: bool,
                     device: torch.device) -> dict[str, float]:
    """``validate_network``: top-1 (and top-5 with >= 5 classes) in percent, mean loss, over the val set."""
    head.eval()
    correct1 = correct5 = 0
    loss_sum, total = 0.0, 0
    for images, target in track(loader, "linear_imagenet validate", unit="batch", items_of=lambda b: len(b[1]),
                                bar=True):
        images, target = images.to(device), target.to(device)
        logits = head(linear_feature(backbone, images, n_last, avgpool))
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(target.view(-1, 1))
        correct1 += int(hit[:, :1].sum())
        correct5 += int(hit.sum())
        total += len(target)
    out = {"acc1": 100.0 * correct1 / total, "loss": loss_sum / total}
    if head.num_labels >= 5:
        out["acc5"] = 100.0 * correct5 / total
    return out


def run_linear_cls(backbone: nn.Module, data_root: Path, cfg: LinearClsConfig, out_dir: Path | None = None,
                   device: str = "cpu", *, state_path: Path | None = None) -> dict[str, Any]:
    """Train DINO's linear classifier on ``backbone``'s frozen features (ImageFolder train), validate on val.

    ``linear_top1`` is the best validation top-1 over the epochs (the official result), ``final_top1`` the
    last epoch's; ``history`` holds every epoch. With ``state_path`` a preempted run resumes (module docstring)
    and the state is deleted once the metrics exist.
    """
    cfg.validate()
    t0 = time.time()
    dev = torch.device(device)
    info = backbone_info(backbone)
    resize, crop = eval_sizes(cfg.crop_size, cfg.resize_size, info.img_size)
    train = LabelledImageFolder(data_root, "train", cfg.max_train_items)
    val = LabelledImageFolder(data_root, "val", cfg.max_val_items)
    if train.classes != val.classes:
        raise ConfigError(f"{Path(data_root) / 'val'}: class folders differ from train's; both splits need the "
                          f"same <wnid> folders")
    state = open_train_state(state_path, "linear_imagenet", cfg, backbone)
    was_training = backbone.training
    grad_flags = [p.requires_grad for p in backbone.parameters()]
    backbone.to(dev).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        result = _train(backbone, train, val, cfg, dev, info.embed_dim, resize, crop, info.mean, info.std, state)
    finally:
        backbone.train(was_training)
        for p, flag in zip(backbone.parameters(), grad_flags):
            p.requires_grad_(flag)
    result.update({"num_train": len(train), "num_val": len(val), "resize_size": resize, "crop_size": crop,
                   "device": str(dev), "config": asdict(cfg), "wall_time_s": time.time() - t0})
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    if state is not None:
        state.discard()
    return result


def _train(backbone: nn.Module, train: LabelledImageFolder, val: LabelledImageFolder, cfg: LinearClsConfig,
           dev: torch.device, embed_dim: int, resize: int, crop: int, mean: tuple[float, ...],
           std: tuple[float, ...], state: TrainState | None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    n_last, avgpool = cfg.resolved(embed_dim)
    dim = feature_dim(backbone, embed_dim, n_last, avgpool)
    head = LinearClassifier(dim, train.num_classes).to(dev)
    base_lr = cfg.lr * cfg.batch_size / 256.0  # linear scaling rule (world size folded into batch_size)
    optimizer = torch.optim.SGD(head.parameters(), base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    progress: dict[str, Any] = {"epoch": 0, "batch": 0, "best_acc": 0.0, "history": [], "loss_sum": 0.0}
    saved = state.load() if state is not None else None
    if saved is not None:
        head.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = saved["progress"]

    def snapshot() -> dict[str, Any]:
        return {"model": head.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress}

    augment = train_transform(crop, mean, std)
    items = SeededAugmentation(_Pairs(train), _AugmentPair(augment), cfg.seed)
    val_loader = DataLoader(TransformedPairs(val, eval_transform(resize, crop, mean, std)),
                            batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
    n = len(train)
    per_epoch = math.ceil(n / cfg.batch_size)
    lines = Progress("linear_imagenet train", cfg.epochs * per_epoch, unit="batch",
                     initial=progress["epoch"] * per_epoch + progress["batch"], bar=True)
    with lines, StopSignals(active=state is not None) as signals:
        while progress["epoch"] < cfg.epochs:
            epoch = progress["epoch"]
            for group in optimizer.param_groups:
                group["lr"] = cosine_epoch_lr(base_lr, epoch, cfg.epochs)
            order = _epoch_order(n, cfg.seed, epoch)
            batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(progress["batch"], per_epoch)]
            items.set_epoch(epoch)
            loader = DataLoader(items, batch_sampler=batches, num_workers=cfg.num_workers)
            head.train()
            for images, target in loader:
                images, target = images.to(dev), target.to(dev)
                with torch.no_grad():
                    feats = linear_feature(backbone, images, n_last, avgpool)
                loss = nn.functional.cross_entropy(head(feats), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress["batch"] += 1
                progress["loss_sum"] += loss.item()
                lines.update(1, items=len(target), epoch=(epoch + 1, cfg.epochs),
                             loss=progress["loss_sum"] / progress["batch"], lr=optimizer.param_groups[0]["lr"])
                if state is not None and signals.received is not None:
                    state.preempt(snapshot(), signals.received, f"in epoch {epoch}, batch {progress['batch']}")
                if state is not None and cfg.checkpoint_every and progress["batch"] % cfg.checkpoint_every == 0:
                    state.save(snapshot())
            record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                      "train_loss": progress["loss_sum"] / per_epoch}
            if epoch % cfg.val_freq == 0 or epoch == cfg.epochs - 1:
                stats = validate_network(backbone, head, val_loader, n_last, avgpool, dev)
                progress["best_acc"] = max(progress["best_acc"], stats["acc1"])
                record.update({f"test_{k}": v for k, v in stats.items()})
            progress["history"].append(record)
            progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0)
            if state is not None:
                state.save(snapshot())
    last = next(r for r in reversed(progress["history"]) if "test_acc1" in r)
    return {"protocol": "linear_imagenet", "linear_top1": progress["best_acc"], "final_top1": last["test_acc1"],
            "final_top5": last.get("test_acc5"), "num_classes": train.num_classes, "feature_dim": dim,
            # None for ResNets: they read the pooled feature, as eval_linear.py's model(inp)
            "n_last_blocks": None if is_resnet(backbone) else n_last,
            "avgpool_patchtokens": None if is_resnet(backbone) else avgpool,
            "base_lr": base_lr, "history": progress["history"]}

