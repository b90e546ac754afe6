"""iNaturalist 2019 end-to-end fine-tuning (GTSA's classification protocol).

Official repo bok3948/GTSA @ c0dfe2b, folder ``downstream/classification/iNat19_classification/`` (the MAE
fine-tuning code base; paper arXiv 2304.08014). What one run does:

* a copy of the backbone (drop-path 0.1, linear over the blocks) feeds a new classifier: by default the mean
  of the patch tokens *without* the final LayerNorm, then ``mlp_head`` = LayerNorm + Linear (``models_vit.py``
  ``forward``); ``pool='cls'`` uses the class token instead (mean of all tokens for a backbone without one);
* after building, ``trunc_normal_(std=2e-5)`` on ``mlp_head[0].weight`` and ``mlp_head[1].weight``
  (``main_finetune.py``); index 0 is the LayerNorm, so its gain starts near 0 too. That is a quirk of the
  official code, kept by default for parity (``head_norm_init_quirk``);
* AdamW over BEiT-style layer-decay parameter groups (``util/lr_decay.py`` ``param_groups_lrd``): patch
  embedding, class token and position embedding are layer 0, block i is layer i + 1, everything else
  (final norm, head) is layer depth + 1; the lr of layer l is scaled by decay^(depth + 1 - l). 1-D parameters
  and ``no_weight_decay()`` names get no weight decay;
* lr per iteration: linear warm-up then half-cycle cosine to ``min_lr`` (MAE ``util/lr_sched.py``
  ``adjust_learning_rate``, evaluated at the fractional epoch);
* train pipeline timm ``create_transform`` (RandomResizedCrop + flip + RandAugment + random erasing, bicubic),
  mixup/cutmix via ``timm.data.Mixup`` with label smoothing folded into the soft targets and
  ``SoftTargetCrossEntropy``; eval pipeline Resize(input / crop_pct) + CenterCrop (``util/datasets.py``);
* top-1 / top-5 accuracy on ``val2019.json`` after every ``eval_every`` epochs and at the end.

Deliberate differences, each a config value: the official code runs fp16 autocast with a GradScaler
(``NativeScaler``); we use bf16 autocast on CUDA (no scaler needed) and fp32 on CPU. The official code runs on
8 GPUs with 128 images each; this runner is single-process, so ``batch_size`` is the effective batch, split
into ``accum_iter`` micro-batches (``accum_iter=8`` reproduces the per-GPU batch of 128 and therefore one
mixup draw per 128 images). Distributed evaluation (``--dist_eval``) pads the 3,030 validation images to a
multiple of the GPU count; we evaluate every image exactly once. The official loader shuffles with a
``DistributedSampler``; here the order is a function of (seed, epoch) and each image's augmentation RNGs are
seeded from (seed, epoch, index), and mixup/cutmix/drop-path are re-seeded from (seed, micro-batch) — so a run
can be resumed exactly (``state_path``: state saved every ``checkpoint_every`` updates and on SIGTERM/SIGUSR1,
see ``resume.TrainState``) and the worker count does not change the result.

Smoke and paper scale use this same code; only the numbers in :class:`InatFinetuneConfig` change.
"""

from __future__ import annotations

import copy
import math
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
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from densessl.data.inat import INat2019
from densessl.errors import ConfigError
from densessl.evaluate.inat_finetune_config import (  # noqa: F401  (re-exported)
    LR_MODES,
    POOLS,
    PRECISIONS,
    REPORTS,
    InatFinetuneConfig,
)
from densessl.evaluate.linear_seg import set_drop_path
from densessl.evaluate.resume import ResumableBatches, StopSignals, TrainState, open_train_state, seed_step
from densessl.io import write_json
from densessl.models.backbones import backbone_info
from densessl.progress import Progress, track
from densessl.train.signals import ignore_stop_signals

REF = "bok3948/GTSA@c0dfe2b downstream/classification/iNat19_classification/main_finetune.py"


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k (k clipped to the number of
    classes, as ``timm.utils.accuracy``). Ties are broken by ``torch.topk``."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top.eq(targets.view(-1, 1))
    return [int(hit[:, :min(k, maxk)].any(1).sum().item()) for k in ks]


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    n = targets.numel()
    return [100.0 * c / n for c in topk_correct(logits, targets, ks)]


# ----------------------------------------------------------------------------------------------------------
# Layer-wise lr decay and schedule
# ----------------------------------------------------------------------------------------------------------

def vit_layer_id(name: str, num_layers: int) -> int:
    """BEiT/MAE ``get_layer_id_for_vit`` on a backbone-relative parameter name: embeddings -> 0,
    ``blocks.i.*`` -> i + 1, anything else (final norm, heads) -> ``num_layers`` (= depth + 1)."""
    if name in ("cls_token", "pos_embed", "reg_token", "dist_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(backbone: nn.Module, head: nn.Module, weight_decay: float, layer_decay: float,
                             ) -> list[dict[str, Any]]:
    """AdamW parameter groups following GTSA ``util/lr_decay.py`` ``param_groups_lrd`` (after BEiT).

    One group per (layer, decay/no-decay); each carries ``lr_scale = layer_decay ** (depth + 1 - layer_id)``
    and a ``layer_id``; head parameters are in layer depth + 1 (scale 1). No weight decay for 1-D parameters
    and for the backbone's ``no_weight_decay()`` names (pos_embed, cls_token, ...).
    """
    num_layers = len(backbone.blocks) + 1
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    groups: dict[str, dict[str, Any]] = {}
    named = [(n, p, vit_layer_id(n, num_layers)) for n, p in backbone.named_parameters()]
    named += [(f"head.{n}", p, num_layers) for n, p in head.named_parameters()]
    for name, param, layer_id in named:
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in skip
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"lr_scale": layer_decay ** (num_layers - layer_id), "layer_id": layer_id,
                           "weight_decay": 0.0 if no_decay else weight_decay, "params": [], "names": []}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def lr_at(epoch: float, peak_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """MAE ``util/lr_sched.py`` ``adjust_learning_rate`` at a fractional epoch: linear warm-up from 0, then
    half-cycle cosine from ``peak_lr`` to ``min_lr``."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def posterize_zero_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's ``posterize`` op, with 0 bits kept giving a black image instead of an error.

    Why: ``rand-m9-mstd0.5-inc1`` draws the magnitude from N(9, 0.5) clipped to 10, and ``PosterizeIncreasing``
    at magnitude 10 keeps 4 - 4 = 0 bits. Pillow < 11 accepted 0 (mask ~255: every pixel 0, as the TF
    RandAugment the level function follows); newer Pillow raises ``ValueError`` and would stop training after
    a few thousand images. This restores the behaviour the official runs had.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> int:
    """Swap :func:`posterize_zero_bits` into every RandAugment posterize op of ``transform``; returns the count."""
    count = 0
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = posterize_zero_bits
                count += 1
    return count


def train_transform(cfg: InatFinetuneConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[..., Any]:
    """GTSA ``util/datasets.py`` ``build_transform(is_train=True)``: timm ``create_transform`` (RandomResizedCrop
    0.08-1, flip 0.5, RandAugment, ToTensor, Normalize, RandomErasing)."""
    transform = create_transform(input_size=cfg.input_size, is_training=True, scale=cfg.crop_scale,
                                 color_jitter=cfg.color_jitter,
                                 auto_augment=cfg.auto_augment or None, interpolation=cfg.interpolation,
                                 re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, mean=mean, std=std)
    _patch_posterize(transform)
    return transform


def eval_transform(cfg: InatFinetuneConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[..., Any]:
    """GTSA ``util/datasets.py`` eval branch: Resize(int(input / crop_pct), bicubic) of the short side,
    CenterCrop(input), ToTensor, Normalize. The official crop_pct is 224/256 up to 224 px and 1.0 above."""
    size = int(cfg.input_size / cfg.eval_crop_pct)
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class TransformedINat(Dataset):
    """(transformed image tensor, label) pairs of one :class:`INat2019` split."""

    def __init__(self, reader: INat2019, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.reader, self.transform = reader, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.reader[index]
        return self.transform(image), label


def build_mixup(cfg: InatFinetuneConfig, num_classes: int) -> Mixup | None:
    """``main_finetune.py``: Mixup with label smoothing folded into the mixed one-hot targets."""
    if not cfg.mixup_active:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def build_criterion(cfg: InatFinetuneConfig) -> nn.Module:
    """``main_finetune.py``: soft-target CE with mixup, else label-smoothing CE, else plain CE."""
    if cfg.mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class InatClassifier(nn.Module):
    """Backbone + pooled feature + ``head`` (LayerNorm + Linear, as GTSA's ``mlp_head``).

    The backbone is used as given: pass a copy prepared by :func:`prepare_backbone` (final norm removed when
    ``final_norm`` is off, drop-path set, input size set).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "mean_patch", head_norm: bool = True,
                 head_init_std: float = 2e-5, head_norm_init_quirk: bool = True) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"inat_finetune: pool={pool!r} is not one of {list(POOLS)}")
        self.backbone = backbone
        self.pool = pool
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        dim = int(backbone.embed_dim)
        layers: list[nn.Module] = [nn.LayerNorm(dim)] if head_norm else []  # nn.LayerNorm default eps (official)
        layers.append(nn.Linear(dim, num_classes))
        self.head = nn.Sequential(*layers)
        # models_vit.py _init_weights (Linear trunc_normal 0.02, bias 0; LayerNorm 1/0), then main_finetune.py
        # re-initialises mlp_head[0].weight and mlp_head[1].weight with std 2e-5.
        linear = self.head[-1]
        nn.init.zeros_(linear.bias)
        trunc_normal_(linear.weight, std=head_init_std)
        if head_norm and head_norm_init_quirk:
            trunc_normal_(self.head[0].weight, std=head_init_std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        if self.pool == "cls" and self.num_prefix_tokens > 0:
            return tokens[:, 0]
        if self.pool == "cls":  # no class token: mean of all tokens
            return tokens.mean(1)
        return tokens[:, self.num_prefix_tokens:].mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def prepare_backbone(backbone: nn.Module, cfg: InatFinetuneConfig) -> nn.Module:
    """A trainable copy of ``backbone`` set up for fine-tuning at ``cfg.input_size``."""
    if not (hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed") and hasattr(backbone, "forward_features")):
        raise ConfigError("inat_finetune: the backbone must be a timm VisionTransformer (patch_embed, blocks, "
                          f"forward_features); got {type(backbone).__name__}")
    encoder = copy.deepcopy(backbone)
    for p in encoder.parameters():
        p.requires_grad_(True)
    set_drop_path(encoder, cfg.drop_path)
    if not cfg.final_norm:
        encoder.norm = nn.Identity()  # official forward skips self.norm; its weights are then unused
    patch = backbone_info(encoder).patch_size
    if cfg.input_size % patch:
        raise ConfigError(f"inat_finetune: input_size={cfg.input_size} is not a multiple of the patch size {patch}")
    if backbone_info(encoder).img_size != cfg.input_size:
        # resample pos_embed once, as main_finetune.py interpolate_pos_embed does at load time
        encoder.set_input_size(img_size=(cfg.input_size, cfg.input_size))
    return encoder


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, float]:
    """Top-1 / top-5 (percent) and the plain cross-entropy over every validation image (engine ``evaluate``)."""
    model.eval()
    correct = [0, 0]
    loss_sum, n = 0.0, 0
    for images, targets in track(loader, "inat eval", unit="batch", items_of=lambda b: len(b[1]), bar=True):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        c1, c5 = topk_correct(logits, targets, (1, 5))
        correct[0] += c1
        correct[1] += c5
        n += targets.numel()
    return {"top1": 100.0 * correct[0] / n, "top5": 100.0 * correct[1] / n, "loss": loss_sum / n, "num_val": n}


@dataclass
class _InatProgress:
    """Where a run stands, all a resume needs besides model and optimiser: the position in the data (epoch,
    micro-batches of it done), updates done, the current epoch's running loss and lr, and the logs so far."""

    epoch: int = 0
    batch: int = 0
    updates: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    lr: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch, self.loss_sum, self.loss_n, self.lr = 0, 0.0, 0, 0.0


class _FinetuneLoop:
    """The MAE ``train_one_epoch`` / ``evaluate`` loop of one run, continuing a saved state of the same run.

    States are saved only at update boundaries (no half-accumulated gradients to keep) and after an epoch's
    evaluation; a stop signal is acted on at the next of these.
    """

    def __init__(self, model: InatClassifier, optimizer: torch.optim.Optimizer, mixup: Mixup | None,
                 criterion: nn.Module, batches: ResumableBatches, val_loader: DataLoader, cfg: InatFinetuneConfig,
                 dev: torch.device, autocast: Callable[[], AbstractContextManager[Any]],
                 state: TrainState | None) -> None:
        self.model, self.optimizer, self.mixup, self.criterion = model, optimizer, mixup, criterion
        self.batches, self.val_loader, self.cfg, self.dev, self.autocast = batches, val_loader, cfg, dev, autocast
        self.state = state
        self.steps_per_epoch = batches.per_epoch
        self.progress = _InatProgress()
        saved = state.load() if state is not None else None
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            self.progress = _InatProgress(**saved["progress"])

    def snapshot(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": asdict(self.progress)}

    def run(self, out_dir: Path | None) -> _InatProgress:
        p, total = self.progress, self.cfg.epochs * self.steps_per_epoch
        self.bar = Progress("inat train", total, unit="batch", initial=p.epoch * self.steps_per_epoch + p.batch,
                            items_per_step=self.cfg.batch_size // self.cfg.accum_iter, bar=True)
        try:
            with StopSignals(active=self.state is not None) as signals:
                while self.progress.epoch < self.cfg.epochs:
                    self.train_epoch(signals)
                    self.finish_epoch(out_dir)
                    if self.state is not None and signals.received is not None and p.epoch < self.cfg.epochs:
                        self.state.preempt(self.snapshot(), signals.received,
                                           f"after epoch {p.epoch - 1} (update {p.updates})")
            self.bar.finish()
        finally:
            self.bar.close()
        return self.progress

    def train_epoch(self, signals: StopSignals) -> None:
        p, cfg = self.progress, self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for step, (images, targets) in enumerate(self.batches.epoch(p.epoch, p.batch), start=p.batch):
            if step % cfg.accum_iter == 0:  # engine_finetune.py: lr set per update at the fractional epoch
                self._set_lr(p.epoch + step / self.steps_per_epoch)
            # mixup/cutmix (numpy) and drop-path (torch) draws depend on the micro-batch only
            seed_step(cfg.seed, p.epoch * self.steps_per_epoch + step)
            value = self._forward_backward(images, targets, step)
            p.batch, p.loss_sum, p.loss_n = step + 1, p.loss_sum + value, p.loss_n + 1
            self.bar.update(1, epoch=(p.epoch + 1, cfg.epochs), loss=p.loss_sum / p.loss_n, lr=p.lr)
            if p.batch % cfg.accum_iter == 0:
                self._update(signals)

    def _set_lr(self, fractional_epoch: float) -> None:
        cfg = self.cfg
        self.progress.lr = lr_at(fractional_epoch, cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.progress.lr * group["lr_scale"]

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> float:
        images, targets = images.to(self.dev, non_blocking=True), targets.to(self.dev, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast():
            loss = self.criterion(self.model(images).float(), targets)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"inat_finetune: loss is {value} at epoch {self.progress.epoch}, step {step}")
        (loss / self.cfg.accum_iter).backward()
        return value

    def _update(self, signals: StopSignals) -> None:
        p, cfg = self.progress, self.cfg
        if cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.updates += 1
        if self.state is None:
            return
        if signals.received is not None:
            self.state.preempt(self.snapshot(), signals.received, f"after update {p.updates} (epoch {p.epoch}, "
                               f"micro-batch {p.batch}/{self.steps_per_epoch})")
        if cfg.checkpoint_every and p.updates % cfg.checkpoint_every == 0:
            self.state.save(self.snapshot())

    def finish_epoch(self, out_dir: Path | None) -> None:
        """Log the epoch, evaluate when due, rewrite ``log.json`` (as the official ``log.txt``)."""
        p, cfg = self.progress, self.cfg
        entry: dict[str, Any] = {"epoch": p.epoch, "train_loss": p.loss_sum / max(p.loss_n, 1), "train_lr": p.lr}
        if (p.epoch + 1) % cfg.eval_every == 0 or p.epoch == cfg.epochs - 1:
            stats = evaluate(self.model, self.val_loader, self.dev, self.autocast)
            entry.update({f"test_{k}": v for k, v in stats.items()})
            p.evals.append({"epoch": p.epoch, **stats})
        p.log.append(entry)
        if out_dir is not None:
            write_json(Path(out_dir) / "log.json", p.log)
        p.next_epoch()


def run_inat_finetune(backbone: nn.Module, data_root: Path, cfg: InatFinetuneConfig, out_dir: Path | None = None,
                      device: str = "cpu", *, state_path: Path | None = None) -> dict[str, Any]:
    """Fine-tune a copy of ``backbone`` with a new head on iNat 2019 train, evaluate top-1/top-5 on val.

    Returns ``{"top1", "top5", "details"}`` (accuracies in percent; ``cfg.report`` picks the final or the
    best evaluated epoch); ``details`` holds the final and best accuracies, the per-epoch log (train loss,
    lr, val top-1/top-5/loss) and run facts. With ``out_dir``, ``metrics.json`` and ``log.json`` (the per-epoch
    log, rewritten after every epoch like the official ``log.txt``) are written there. The caller's ``backbone`` is not modified.

    With ``state_path`` the run is resumable: a state saved there by this same run (config and backbone) is
    continued, the state is saved every ``cfg.checkpoint_every`` updates and on SIGTERM/SIGUSR1 (then
    ``Preempted`` is raised), and it is deleted once the metrics exist. The result equals an uninterrupted run.
    """
    cfg.validate()
    t0 = time.time()
    dev = torch.device(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    info = backbone_info(backbone)
    train_reader = INat2019(data_root, "train", max_items=cfg.max_train_items)
    val_reader = INat2019(data_root, "val", max_items=cfg.max_val_items)
    num_classes = cfg.num_classes or train_reader.num_classes
    for reader in (train_reader, val_reader):
        if max(reader.labels) >= num_classes:
            raise ConfigError(f"inat_finetune: {reader.json_path} has label {max(reader.labels)} but "
                              f"num_classes={num_classes}; leave num_classes unset to use len(categories)")
    micro = cfg.batch_size // cfg.accum_iter
    if len(train_reader) < micro:
        raise ConfigError(f"inat_finetune: {len(train_reader)} training images < micro-batch {micro} "
                          f"(batch_size / accum_iter); lower batch_size or raise max_train_items")
    state = open_train_state(state_path, "inat19_finetune", cfg, backbone)

    model = InatClassifier(prepare_backbone(backbone, cfg), num_classes, cfg.pool, cfg.head_norm,
                           cfg.head_init_std, cfg.head_norm_init_quirk).to(dev)
    groups = param_groups_layer_decay(model.backbone, model.head, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=cfg.peak_lr(), betas=cfg.betas)
    use_bf16 = cfg.precision == "bf16" and dev.type == "cuda"

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    train_data = TransformedINat(train_reader, train_transform(cfg, info.mean, info.std))
    val_data = TransformedINat(val_reader, eval_transform(cfg, info.mean, info.std))
    pin = dev.type == "cuda"
    batches = ResumableBatches(train_data, micro, cfg.seed, cfg.num_workers, pin)
    # workers ignore stop signals: validation runs inside the loop's StopSignals, which saves the state
    val_loader = DataLoader(val_data, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                            pin_memory=pin, worker_init_fn=ignore_stop_signals)
    loop = _FinetuneLoop(model, optimizer, build_mixup(cfg, num_classes), build_criterion(cfg), batches,
                         val_loader, cfg, dev, autocast, state)
    progress = loop.run(out_dir)

    final = progress.evals[-1]
    best = max(progress.evals, key=lambda e: (e["top1"], e["top5"]))
    chosen = final if cfg.report == "final" else best
    details: dict[str, Any] = {
        "protocol": "inat19_finetune",
        "final": final,
        "best": best,
        "report": cfg.report,
        "epochs": progress.log,
        "num_classes": num_classes,
        "num_train": len(train_data),
        "num_val": len(val_data),
        "updates": progress.updates,
        "steps_per_epoch": loop.steps_per_epoch,
        "peak_lr": cfg.peak_lr(),
        "lr_scales": {g["layer_id"]: g["lr_scale"] for g in groups},
        "patch_size": info.patch_size,
        "device": str(dev),
        "autocast_bf16": use_bf16,
        "config": asdict(cfg),
        "reference": REF,
        "wall_time_s": time.time() - t0,
    }
    result = {"top1": chosen["top1"], "top5": chosen["top5"], "details": details}
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    if state is not None:
        state.discard()
    return result
