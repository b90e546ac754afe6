"""Segmenter linear decoder on ADE20K (LOCA's segmentation protocol).

Segmenter (arXiv 2105.05633; official repo rstrudel/segmenter @ 20d1bfa): the backbone (fine-tuned end to
end) plus one
``nn.Linear(D, n_cls)`` on every patch token, logits bilinearly upsampled to the input size; per-pixel
cross-entropy after ``reduce_zero_label`` (0 = other -> ignored); SGD + polynomial decay; evaluation by
sliding-window inference on the test-scaled image and mmseg IoU accumulated over the validation set.

The data pipeline re-implements the mmseg pipeline Segmenter configures (``segm/data/config/ade20k.py``) in
torch, without OpenCV: ``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))`` with keep-ratio rescaling
(mmcv ``rescale_size`` rounding), ``RandomCrop(crop_size, cat_max_ratio=0.75)`` (up to 10 re-draws),
``RandomFlip(0.5)``, ``PhotoMetricDistortion``, ``Normalize`` (backbone mean/std), ``Pad`` (image 0, label
255). Bilinear resizing is ``F.interpolate(align_corners=False)`` rounded to 8-bit values, which is what
OpenCV's INTER_LINEAR does on uint8 images; labels use nearest. The photometric distortion follows mmseg
step by step (brightness +-32, contrast x[0.5, 1.5] before or after the HSV steps, saturation x[0.5, 1.5],
hue +-18 on OpenCV's 0-180 scale, each with p = 0.5, 8-bit truncation after each step) with one
simplification: the HSV round trip is done in floating point instead of OpenCV's 8-bit HSV, so H/S/V are not
quantised. All randomness comes from torch's RNG.

Resumable (paper scale runs for hours on preemptible SLURM jobs): the image order is a function of
(seed, epoch) (``EpochPermutationSampler``), each crop's RNGs are seeded from (seed, epoch, index)
(``SeededAugmentation``) and drop-path's from (seed, iteration), so neither depends on the number of
DataLoader workers or on where a run was interrupted. With ``state_path`` the model, optimiser and loss curve
are saved every ``checkpoint_every`` iterations and on SIGTERM/SIGUSR1, and a re-run continues exactly where
the saved one stopped (``evaluate.resume``, shared with ``inat_finetune``).

Smoke and paper scale use this same code; only the numbers in :class:`LinearSegConfig` change.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.data import DataLoader, Dataset

from densessl.data.ade20k import ADE20KSegmentation
from densessl.errors import ConfigError
from densessl.evaluate.linear_seg_config import LinearSegConfig
from densessl.evaluate.metrics import IoUAccumulator, reduce_zero_label_map
from densessl.evaluate.resume import ResumableBatches, StopSignals, TrainState, open_train_state, seed_step
from densessl.io import write_json
from densessl.models.backbones import ResNetTokens, backbone_info
from densessl.progress import Progress, track
from densessl.train.signals import ignore_stop_signals

IGNORE_INDEX = 255
REF = "rstrudel/segmenter@20d1bfa segm/config.yml"


# ----------------------------------------------------------------------------------------------------------
# Geometry and photometric transforms (mmseg semantics; images are float (3, H, W) in [0, 255])
# ----------------------------------------------------------------------------------------------------------

def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the largest size whose long edge <= max(scale) and short edge
    <= min(scale); ``int(x * f + 0.5)`` rounding. Returns (new_width, new_height)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(img: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel, no antialias) like OpenCV INTER_LINEAR, rounded to 8-bit values."""
    if tuple(img.shape[-2:]) == tuple(size_hw):
        return img
    out = F.interpolate(img[None], size=size_hw, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def resize_labels(labels: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(labels.shape[-2:]) == tuple(size_hw):
        return labels
    return F.interpolate(labels[None, None].float(), size=size_hw, mode="nearest")[0, 0].long()


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()).item())


def random_resize(img: torch.Tensor, labels: torch.Tensor, base_scale: tuple[int, int],
                  ratio_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg ``Resize(img_scale, ratio_range)`` / ``RandomResize(keep_ratio=True)``."""
    ratio = _uniform(*ratio_range)
    scale = (int(base_scale[0] * ratio), int(base_scale[1] * ratio))
    w, h = rescale_size(img.shape[-1], img.shape[-2], scale)
    return resize_image(img, (h, w)), resize_labels(labels, (h, w))


def random_crop(img: torch.Tensor, labels: torch.Tensor, crop: int, cat_max_ratio: float,
                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg ``RandomCrop``: re-draw up to 10 times while one class covers >= cat_max_ratio of the crop."""
    h, w = labels.shape

    def draw() -> tuple[int, int]:
        oy = int(torch.randint(0, max(h - crop, 0) + 1, ()).item())
        ox = int(torch.randint(0, max(w - crop, 0) + 1, ()).item())
        return oy, ox

    oy, ox = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            seg = labels[oy:oy + crop, ox:ox + crop]
            cnt = torch.bincount(seg[seg != ignore_index].reshape(-1))
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max().item() / cnt.sum().item() < cat_max_ratio:
                break
            oy, ox = draw()
    return img[:, oy:oy + crop, ox:ox + crop], labels[oy:oy + crop, ox:ox + crop]


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 255] -> HSV with H in [0, 180) (OpenCV's 8-bit convention), S, V in [0, 255]."""
    r, g, b = img[0], img[1], img[2]
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h * 30.0, torch.zeros_like(h))  # 60 degrees per sector, halved
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)) * 255.0,
                    torch.zeros_like(maxc))
    return torch.stack([h % 180.0, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv[0] * 2.0, hsv[1] / 255.0, hsv[2]
    c = v * s
    hp = (h / 60.0) % 6
    x = c * (1 - (hp % 2 - 1).abs())
    zero = torch.zeros_like(c)
    sector = hp.floor().long().clamp(0, 5)
    r = torch.stack([c, x, zero, zero, x, c]).gather(0, sector[None])[0]
    g = torch.stack([x, c, c, x, zero, zero]).gather(0, sector[None])[0]
    b = torch.stack([zero, zero, x, c, c, x]).gather(0, sector[None])[0]
    m = v - c
    return torch.stack([r + m, g + m, b + m])


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion.convert``: x * alpha + beta, clipped to [0, 255], cast to uint8."""
    return (x * alpha + beta).clamp_(0, 255).floor_()


def photometric_distortion(img: torch.Tensor, brightness_delta: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion`` (see the module docstring for the one simplification)."""
    if _coin():
        img = _convert(img, beta=_uniform(-brightness_delta, brightness_delta))
    contrast_first = _coin()  # mmseg: mode = randint(2); mode 1 = contrast before the HSV steps
    if contrast_first and _coin():
        img = _convert(img, alpha=_uniform(*contrast))
    if _coin():
        hsv = rgb_to_hsv(img)
        hsv[1] = _convert(hsv[1], alpha=_uniform(*saturation))
        img = hsv_to_rgb(hsv).round_().clamp_(0, 255)
    if _coin():
        hsv = rgb_to_hsv(img)
        hsv[0] = (hsv[0] + int(torch.randint(-hue_delta, hue_delta, ()).item())) % 180.0
        img = hsv_to_rgb(hsv).round_().clamp_(0, 255)
    if not contrast_first and _coin():
        img = _convert(img, alpha=_uniform(*contrast))
    return img


def normalize(img: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[0, 255] image -> (x / 255 - mean) / std, i.e. mmseg Normalize with mean*255, std*255."""
    m = torch.tensor(mean, dtype=img.dtype).view(3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=img.dtype).view(3, 1, 1) * 255.0
    return (img - m) / s


def pad_to(img: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg ``Pad(size=crop)``: bottom/right, image with 0 (after Normalize), labels with 255."""
    ph, pw = max(size - img.shape[-2], 0), max(size - img.shape[-1], 0)
    if ph or pw:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        labels = F.pad(labels, (0, pw, 0, ph), value=IGNORE_INDEX)
    return img, labels


def _pil_to_tensor(image: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()


class ADE20KTrain(Dataset):
    """Augmented training crops: (normalised image (3, crop, crop), labels (crop, crop) int64, 255 ignored)."""

    def __init__(self, reader: ADE20KSegmentation, cfg: LinearSegConfig, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        self.reader, self.cfg, self.mean, self.std = reader, cfg, mean, std

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        image, raw = self.reader[index]
        img = _pil_to_tensor(image)
        lab = raw.astype(np.int64)
        if cfg.reduce_zero_label:
            lab = reduce_zero_label_map(lab)
        labels = torch.from_numpy(lab)
        img, labels = random_resize(img, labels, cfg.base_scale, cfg.ratio_range)
        img, labels = random_crop(img, labels, cfg.crop_size, cfg.cat_max_ratio)
        if torch.rand(()).item() < cfg.flip:
            img, labels = img.flip(-1), labels.flip(-1)
        if cfg.photometric:
            img = photometric_distortion(img)
        img = normalize(img, self.mean, self.std)
        return pad_to(img, labels, cfg.crop_size)


class ADE20KVal(Dataset):
    """Test pipeline: keep-ratio resize to the eval scale and normalise; labels returned raw at full size."""

    def __init__(self, reader: ADE20KSegmentation, scale: tuple[int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], ms_ratios: tuple[float, ...] = ()) -> None:
        self.reader, self.scale, self.mean, self.std = reader, scale, mean, std
        self.ms_ratios = ms_ratios

    def __len__(self) -> int:
        return len(self.reader)

    def _scaled(self, img: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
        w, h = rescale_size(img.shape[-1], img.shape[-2], scale)
        return normalize(resize_image(img, (h, w)), self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(single-scale image, labels, one image per multi-scale ratio — empty unless ms_flip)."""
        image, raw = self.reader[index]
        img = _pil_to_tensor(image)
        # MultiScaleFlipAug: scale = (int(w * r), int(h * r)) of the configured scale, then keep-ratio resize
        multi = [self._scaled(img, (int(self.scale[0] * r), int(self.scale[1] * r))) for r in self.ms_ratios]
        return self._scaled(img, self.scale), torch.from_numpy(raw.astype(np.int64)), multi


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

def set_drop_path(backbone: nn.Module, rate: float) -> float:
    """Stochastic depth linearly increasing from 0 to ``rate`` over the blocks (Segmenter / timm rule).

    Returns the rate applied. Drop-path is a property of Segmenter's ViT; a ResNet (CLoVE's rows, wrapped in
    ``ResNetTokens``) has none in torchvision, so the shared protocol setting leaves it as it is and the
    result records ``drop_path_applied: 0`` rather than refusing the row."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        if isinstance(backbone, ResNetTokens) or rate == 0:
            return 0.0
        raise ConfigError(f"linear_seg: drop_path={rate} needs a backbone with .blocks (a timm ViT); got "
                          f"{type(backbone).__name__}: set evaluate.linear_seg.drop_path: 0")
    dpr = torch.linspace(0, rate, len(blocks)).tolist()
    for blk, p in zip(blocks, dpr):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return float(rate)


class LinearSegmenter(nn.Module):
    """Segmenter with the "linear" decoder: Linear(D, n_cls) on patch tokens (prefix tokens dropped),
    reshaped to the patch grid and bilinearly upsampled to the input size. Inputs whose sides are not
    multiples of the patch size are zero-padded bottom/right and the logits cropped back (Segmenter)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        info = backbone_info(backbone)
        self.backbone = backbone
        self.patch_size = info.patch_size
        self.num_prefix_tokens = info.num_prefix_tokens
        self.num_classes = num_classes
        self.head = nn.Linear(info.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)  # Segmenter init_weights
        nn.init.zeros_(self.head.bias)
        self.freeze_backbone = False

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        h0, w0 = im.shape[-2:]
        p = self.patch_size
        im = F.pad(im, (0, (-w0) % p, 0, (-h0) % p))
        h, w = im.shape[-2:]
        ctx = torch.no_grad() if self.freeze_backbone else nullcontext()
        with ctx:
            tokens = self.backbone.forward_features(im)[:, self.num_prefix_tokens:]
        logits = self.head(tokens)  # (B, h/p * w/p, C)
        # (B, C, h/p, w/p) as a view of the (B, h/p, w/p, C) memory: channels-last, which interpolate keeps, so
        # the per-pixel softmax over classes in the loss and the argmax read contiguous memory (cross-entropy
        # forward + backward at (8, 150, 64, 64) on 1 thread: 59 ms instead of 88 ms; same values)
        logits = logits.reshape(im.shape[0], h // p, w // p, self.num_classes).permute(0, 3, 1, 2)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits[:, :, :h0, :w0]


def slide_inference(forward: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, window: int, stride: int,
                    num_classes: int, batch_size: int = 8) -> torch.Tensor:
    """mmseg ``slide_inference``: windows at ``idx * stride`` clamped to the border (a window shrinks to the
    image when the image is smaller), logits summed and divided by the per-pixel window count.

    ``img`` is (1, 3, H, W); returns (1, C, H, W) averaged logits. Windows are forwarded ``batch_size`` at a
    time (all windows of one image have the same size), which changes nothing but speed.
    """
    _, _, h, w = img.shape
    h_grids = max(h - window + stride - 1, 0) // stride + 1
    w_grids = max(w - window + stride - 1, 0) // stride + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + window, h), min(x1 + window, w)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            boxes.append((y1, y2, x1, x2))
    preds = img.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = forward(crops).float()
        for (y1, y2, x1, x2), logit in zip(chunk, out):
            preds[0, :, y1:y2, x1:x2] += logit
            count[0, :, y1:y2, x1:x2] += 1
    return preds / count


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------

def poly_lr(step: int, total: int, base_lr: float, min_lr: float, power: float) -> float:
    """Segmenter ``PolynomialLR`` without warm-up: (base - min) * (1 - step/total)^power + min."""
    return (base_lr - min_lr) * (1 - min(step, total) / total) ** power + min_lr


def evaluate_linear_seg(model: LinearSegmenter, data: ADE20KVal, cfg: LinearSegConfig, device: torch.device,
                        autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, Any]:
    """Sliding-window inference on the test-scaled image, logits resized to the label size, mmseg IoU."""
    model.eval()
    acc = IoUAccumulator(cfg.num_classes, IGNORE_INDEX, cfg.reduce_zero_label)
    acc_ms = IoUAccumulator(cfg.num_classes, IGNORE_INDEX, cfg.reduce_zero_label)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                        worker_init_fn=ignore_stop_signals)  # the stop signals are the training loop's to handle

    def logits_at(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with autocast():
            logits = slide_inference(model, img.to(device)[None], cfg.eval_window, cfg.eval_stride,
                                     cfg.num_classes, cfg.eval_batch_size)
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        for img, labels, multi in track(loader, "linear_seg eval", unit="image", bar=True):
            size = tuple(labels.shape)
            acc.update(logits_at(img, size).argmax(1)[0].cpu(), labels)
            if multi:
                probs = torch.zeros(1, cfg.num_classes, *size, device=device)
                for scaled in multi:
                    probs += logits_at(scaled, size).softmax(1)
                    probs += logits_at(scaled.flip(-1), size).flip(-1).softmax(1)
                acc_ms.update((probs / (2 * len(multi))).argmax(1)[0].cpu(), labels)

    def pct(x):
        return float(x) * 100.0

    def summary(a: IoUAccumulator) -> dict[str, Any]:
        m = a.compute()
        return {"mIoU": pct(m["mIoU"]), "mAcc": pct(m["mAcc"]), "aAcc": pct(m["aAcc"]),
                "per_class_IoU": [pct(v) for v in m["IoU"]], "per_class_Acc": [pct(v) for v in m["Acc"]]}

    out = {**summary(acc), "num_val": acc.num_images}
    if cfg.eval_ms_flip:
        out["ms_flip"] = {**summary(acc_ms), "ratios": list(cfg.eval_ms_ratios), "flip": True}
    return out


@dataclass
class _SegProgress:
    """What a resumed run needs besides model and optimiser: iterations done and the loss-curve bookkeeping."""

    step: int = 0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    window_loss: float = 0.0
    window_n: int = 0

    def record(self, loss: float, lr: float, log_every: int, total: int) -> None:
        """Count one finished iteration; every ``log_every`` (and at the end) its window's mean joins the curve."""
        self.step += 1
        self.window_loss += loss
        self.window_n += 1
        if self.window_n == log_every or self.step == total:
            self.loss_curve.append({"iteration": self.step, "loss": self.window_loss / self.window_n, "lr": lr})
            self.window_loss, self.window_n = 0.0, 0


def _train_linear_seg(model: LinearSegmenter, optimizer: torch.optim.Optimizer, batches: ResumableBatches,
                      cfg: LinearSegConfig, dev: torch.device, autocast: Callable[[], AbstractContextManager[Any]],
                      state: TrainState | None) -> _SegProgress:
    """``cfg.iterations`` SGD updates with the poly schedule, continuing ``state`` when it holds this run."""
    progress = _SegProgress()
    saved = state.load() if state is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = _SegProgress(**saved["progress"])

    def snapshot() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": asdict(progress)}

    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    log_every = max(1, cfg.iterations // 100)
    stream = batches.from_step(progress.step)
    bar = Progress("linear_seg train", cfg.iterations, initial=progress.step, items_per_step=cfg.batch_size, bar=True)
    try:
        with StopSignals(active=state is not None) as signals:
            while progress.step < cfg.iterations:
                model.train()
                if not cfg.finetune_backbone:
                    model.backbone.eval()  # a frozen backbone has no train-time behaviour to keep (no drop-path)
                lr = poly_lr(progress.step, cfg.iterations, cfg.lr, cfg.min_lr, cfg.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                img, labels = next(stream)
                seed_step(cfg.seed, progress.step)  # after loading: the augmentation re-seeds the global RNGs
                img, labels = img.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                with autocast():
                    loss = criterion(model(img), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.record(loss.item(), lr, log_every, cfg.iterations)
                bar.update(1, loss=progress.loss_curve[-1]["loss"] if progress.loss_curve else loss.item(), lr=lr)
                if state is None:
                    continue
                if signals.received is not None:
                    state.preempt(snapshot(), signals.received, f"after iteration {progress.step}/{cfg.iterations}")
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                    state.save(snapshot())
        bar.finish()
    finally:
        stream.close()  # stops the current epoch's worker processes before evaluation starts its own
        bar.close()
    return progress


def run_linear_seg(backbone: nn.Module, data_root: Path, cfg: LinearSegConfig, out_dir: Path | None = None,
                   device: str = "cpu", *, state_path: Path | None = None) -> dict[str, Any]:
    """Train the Segmenter linear decoder (and, by default, fine-tune a copy of ``backbone``) on ADE20K
    training crops for ``cfg.iterations`` updates, then evaluate on the validation split.

    Returns mIoU / mAcc / aAcc in percent, ``per_class_IoU`` / ``per_class_Acc`` (percent, NaN for classes
    absent from labels and predictions), the training-loss curve and run facts; with ``out_dir`` the same
    is written to ``out_dir/metrics.json`` (NaN as null). The caller's ``backbone`` is not modified.

    With ``state_path`` the run is resumable: a state saved there by this same run (config and backbone) is
    continued, the state is saved every ``cfg.checkpoint_every`` iterations and on SIGTERM/SIGUSR1 (then
    ``Preempted`` is raised), and it is deleted once the metrics exist. The result equals an uninterrupted run.
    """
    cfg.validate()
    t0 = time.time()
    dev = torch.device(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    info = backbone_info(backbone)
    train_reader = ADE20KSegmentation(data_root, "train", max_items=cfg.max_train_items)
    val_reader = ADE20KSegmentation(data_root, "val", max_items=cfg.max_val_items)
    if len(train_reader) < cfg.batch_size:
        raise ConfigError(f"linear_seg: {len(train_reader)} training images < batch_size {cfg.batch_size}; "
                          f"lower batch_size or raise max_train_items")
    train_data = ADE20KTrain(train_reader, cfg, info.mean, info.std)
    val_data = ADE20KVal(val_reader, cfg.eval_scale or cfg.base_scale, info.mean, info.std,
                         tuple(cfg.eval_ms_ratios) if cfg.eval_ms_flip else ())
    state = open_train_state(state_path, "linear_seg", cfg, backbone)

    encoder = copy.deepcopy(backbone)
    drop_path_applied = set_drop_path(encoder, cfg.drop_path) if cfg.finetune_backbone else 0.0
    model = LinearSegmenter(encoder, cfg.num_classes).to(dev)
    if cfg.finetune_backbone:
        params = list(model.parameters())
    else:
        model.freeze_backbone = True
        for p in encoder.parameters():
            p.requires_grad_(False)
        params = list(model.head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_bf16 = cfg.precision == "bf16" and dev.type == "cuda"

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    batches = ResumableBatches(train_data, cfg.batch_size, cfg.seed, cfg.num_workers, dev.type == "cuda")
    loss_curve = _train_linear_seg(model, optimizer, batches, cfg, dev, autocast, state).loss_curve

    metrics = evaluate_linear_seg(model, val_data, cfg, dev, autocast)
    result: dict[str, Any] = {
        "protocol": "linear_seg",
        **metrics,
        "num_classes": cfg.num_classes,
        "num_train": len(train_data),
        "iterations": cfg.iterations,
        "final_train_loss": loss_curve[-1]["loss"] if loss_curve else float("nan"),
        "train_loss": loss_curve,
        "patch_size": info.patch_size,
        "drop_path_applied": drop_path_applied,
        "device": str(dev),
        "autocast_bf16": use_bf16,
        "config": asdict(cfg),
        "reference": REF,
        "wall_time_s": time.time() - t0,
    }
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    if state is not None:
        state.discard()
    return result
