"""The three training paths benchmarks/train_step.py times, on the same device, method weights and images.

* ``step``: ``Trainer.train_step`` on one collated batch already made (the exact step ``fit`` runs: schedules,
  re-seeding, bf16 autocast on CUDA, the deferred finiteness check, clipping, the optimiser, teacher EMA, and
  whatever of ``compile`` / ``channels_last`` / ``fused_adamw`` the TrainConfig sets);
* ``end_to_end``: our pretraining from JPEG files on disk: the real dataset (``ImageFolderImages``), the
  trainer's own DataLoader (``Trainer._loader``, so a device data path chosen by a TrainConfig setting is
  what runs) and the same step;
* ``official``: an official-style loop, as facebookresearch/dino @ 7c446df ``main_dino.py`` ``train_one_epoch``
  runs it (PixPro's ``main_pretrain.py`` has the same shape with apex AMP): views made by PIL in DataLoader
  workers, fp16 autocast with a GradScaler on CUDA (fp32 on the CPU, where our trainer also runs fp32),
  eager, the loss read back every step (``math.isfinite(loss.item())``, ``torch.cuda.synchronize()``,
  ``loss.item()`` for the logger), per-parameter clipping with one ``.item()`` per parameter
  (``utils.clip_gradients``), the method's optimiser unfused, then the teacher EMA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate


# ------------------------------------------------------------------------------------------------ images
def write_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` (w, h) in ImageNet's layout ``<root>/train/<wnid>/*.JPEG``. Smooth random
    fields plus fine noise: JPEG sizes and decode times nearer natural photos than white noise would give."""
    rng = np.random.default_rng(seed)
    folder = root / "train" / "n00000000"
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(count):
        coarse = Image.fromarray((rng.random((max(h // 16, 2), max(w // 16, 2), 3)) * 255).astype("uint8"))
        base = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        Image.fromarray(noisy).save(folder / f"img_{i:06d}.JPEG", quality=90)
    return root


def collated_batch(method: Any, images: list[Image.Image]) -> Any:
    from densessl.train.sampling import SeededAugmentation

    views = SeededAugmentation(images, method.views(), seed=0)
    return default_collate([views[i] for i in range(len(images))])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ ours
def train_config(steps: int, batch: int, workers: int, args: Any) -> Any:
    """A TrainConfig for ``steps`` optimiser steps of ``batch`` images, with the benchmark's step settings;
    ``data_path`` only where this densessl's TrainConfig has that field."""
    from densessl.train.trainer import TrainConfig

    fields: dict[str, Any] = dict(epochs=1, batch_size_per_gpu=batch, num_workers=workers, tensorboard=False,
                                  warmup_epochs=0, precision=args.precision, channels_last=args.channels_last,
                                  compile=args.compile, checkpoint_every_steps=10**9, log_every_steps=10**9)
    if args.data_path is not None:
        if not hasattr(TrainConfig, "data_path"):
            raise SystemExit("--data-path: this densessl's TrainConfig has no data_path setting")
        fields["data_path"] = args.data_path
    return TrainConfig(**fields)


class StepPath:
    """``Trainer.train_step`` on one batch made once (no data loading)."""

    def __init__(self, method: Any, images: list[Image.Image], batch: Any, args: Any, out_dir: str):
        from densessl.train.trainer import Trainer

        self.trainer = Trainer(method, images, train_config(1, len(images), 0, args), out_dir, device=args.device)
        self.batch = batch
        self.images = len(images)

    def run(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.trainer.train_step(self.batch, 0)
        sync(self.trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.trainer.train_step(self.batch, 0)
        self.trainer._agree(0, force=True)  # the deferred finiteness check belongs to the timed work
        sync(self.trainer.device)
        return steps * self.images / (time.perf_counter() - start)


class EndToEndPath:
    """Our pretraining from the JPEG folder: the trainer's DataLoader feeding its step."""

    def __init__(self, method: Any, root: Path, batch: int, args: Any, out_dir: str):
        from densessl.data.imagenet import pretraining_images
        from densessl.train.trainer import Trainer

        dataset = pretraining_images("imagenet", root)
        self.trainer = Trainer(method, dataset, train_config(1, batch, args.workers, args), out_dir, device=args.device)
        self.batch = batch
        self.data_path = getattr(self.trainer.cfg, "data_path", "cpu")

    def run(self, warmup: int, steps: int) -> float:
        from densessl.train.step_inputs import group_micro_batches

        trainer = self.trainer
        trainer.epoch, trainer.batch_in_epoch = 0, 0
        batches = group_micro_batches(trainer._loader(), trainer.accumulation)
        start = None
        for i, micro in enumerate(_take(batches, warmup + steps)):
            if i == warmup:
                sync(trainer.device)
                start = time.perf_counter()
            trainer.train_step_accumulated(micro, i)
        trainer._agree(0, force=True)
        sync(trainer.device)
        if start is None:
            raise SystemExit("end_to_end: the JPEG folder holds fewer batches than --warmup + --steps")
        return steps * trainer.total_batch / (time.perf_counter() - start)


def _take(items: Any, n: int) -> Iterator[Any]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


# ------------------------------------------------------------------------------------------------ official
class _ViewsDataset(Dataset):
    """The official pattern: the augmentation is the dataset's transform, drawn from the worker's RNG."""

    def __init__(self, base: Dataset, views: Any):
        self.base, self.views = base, views

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.views(self.base[index])


def clip_gradients_official(model: nn.Module, clip: float) -> list[float]:
    """facebookresearch/dino @ 7c446df ``utils.clip_gradients``, verbatim but for names: one norm, one
    ``.item()`` and one Python-side comparison per parameter."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


class OfficialPath:
    """``main_dino.py`` ``train_one_epoch`` with our method's loss, views and optimiser class."""

    def __init__(self, method: Any, root: Path, batch: int, optimizer_name: str, args: Any):
        from densessl.data.imagenet import pretraining_images
        from densessl.train.optim import _method_param_groups, build_optimizer

        self.device = torch.device(args.device)
        self.method = method.to(self.device)
        self.optimizer = build_optimizer(optimizer_name, _method_param_groups(method, method.student))
        cuda = self.device.type == "cuda"
        self.autocast = cuda  # main_dino.py --use_fp16 True (its default)
        self.scaler = torch.amp.GradScaler("cuda") if cuda else None
        dataset = _ViewsDataset(pretraining_images("imagenet", root), method.views())
        self.loader_args = dict(batch_size=batch, shuffle=True, num_workers=args.workers, pin_memory=cuda,
                                drop_last=True)
        self.dataset = dataset
        self.batch = batch
        self.clip = 3.0  # DINO --clip_grad
        from densessl.train.step_inputs import batch_to_device

        self.to_device = batch_to_device

    def _step(self, batch: Any, it: int) -> float:
        for i, group in enumerate(self.optimizer.param_groups):  # lr / wd schedules, as the official loop
            group["lr"] = 5e-4 * (1.0 - it * 1e-4)
            if i == 0:
                group["weight_decay"] = 0.04
        batch = self.to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            loss, _ = self.method.loss(batch, 0)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"official: loss is {loss.item()}, stopping training")
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            clip_gradients_official(self.method.student, self.clip)
            self.method.cancel_gradients(0)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            clip_gradients_official(self.method.student, self.clip)
            self.method.cancel_gradients(0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.method.update_teacher(0.996)
        sync(self.device)
        return loss.item()

    def run(self, warmup: int, steps: int) -> float:
        loader = DataLoader(self.dataset, **self.loader_args)
        start = None
        for i, batch in enumerate(_take(loader, warmup + steps)):
            if i == warmup:
                sync(self.device)
                start = time.perf_counter()
            self._step(batch, i)
        sync(self.device)
        if start is None:
            raise SystemExit("official: the JPEG folder holds fewer batches than --warmup + --steps")
        return steps * self.batch / (time.perf_counter() - start)
