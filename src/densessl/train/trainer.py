"""The one trainer every pretraining method shares.

What it guarantees: per-iteration schedules as DINO's ``cosine_scheduler``; the official update order
(backward → per-parameter clipping → cancel frozen grads → step → teacher EMA, reference/methods/dino.md §1);
atomic checkpoints every N steps and at every epoch end; resume that continues the exact same run (data order
and augmentations are functions of (seed, epoch, index), RNG states are saved); SIGTERM/SIGUSR1 → checkpoint
and exit with ``REQUEUE_EXIT_CODE``; a non-finite loss stops the run with the step named; JSONL metrics.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from densessl.errors import DenseSSLError
from densessl.io import atomic_path
from densessl.methods.base import PretrainMethod
from densessl.train.sampling import EpochPermutationSampler, SeededAugmentation
from densessl.train.schedules import cosine_schedule

REQUEUE_EXIT_CODE = 3  # a preempted job exits with this code; the launcher requeues it (see launch/)
CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(DenseSSLError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint is written when SIGTERM/SIGUSR1 arrived."""


@dataclass
class TrainConfig:
    epochs: int = 100                   # DINO --epochs
    batch_size_per_gpu: int = 64        # DINO --batch_size_per_gpu
    lr: float = 0.0005                  # DINO --lr, at total batch 256 (linear scaling)
    min_lr: float = 1e-6                # DINO --min_lr
    warmup_epochs: float = 10           # DINO --warmup_epochs
    weight_decay: float = 0.04          # DINO --weight_decay
    weight_decay_end: float = 0.4       # DINO --weight_decay_end
    momentum_teacher: float = 0.996     # DINO --momentum_teacher (cosine → 1)
    clip_grad: float = 3.0              # DINO --clip_grad (per parameter; 0 disables)
    optimizer: str = "adamw"            # DINO --optimizer
    precision: str = "bf16"             # bf16 autocast on CUDA; CPU always runs fp32
    seed: int = 0                       # DINO --seed
    num_workers: int = 10               # DINO --num_workers
    checkpoint_every_steps: int = 1000  # plus one at every epoch end
    log_every_steps: int = 10
    max_train_images: int | None = None  # use the first N images (smoke runs)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def param_groups(module: torch.nn.Module) -> list[dict[str, Any]]:
    """DINO ``utils.get_params_groups``: no weight decay on biases and norm parameters (ndim ≤ 1)."""
    regularized, not_regularized = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients_per_parameter(module: torch.nn.Module, clip: float) -> None:
    """DINO ``utils.clip_gradients``: each parameter's gradient norm is clipped separately, not globally."""
    for p in module.parameters():
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


def build_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    raise DenseSSLError(f"train.optimizer: {name!r} is not supported; use 'adamw' or 'sgd'")


class Trainer:
    def __init__(self, method: PretrainMethod, dataset: Any, cfg: TrainConfig, out_dir: str | Path,
                 device: str | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = _distributed()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed + self.rank)
        self.method = method.to(self.device)
        if self.world > 1:
            self.method.student = torch.nn.parallel.DistributedDataParallel(self.method.student)
        self.dataset = SeededAugmentation(dataset, method.views(), cfg.seed)
        self.sampler = EpochPermutationSampler(len(dataset), cfg.batch_size_per_gpu, cfg.seed, self.rank, self.world)
        if self.sampler.batches_per_epoch == 0:
            raise DenseSSLError(f"train.batch_size_per_gpu={cfg.batch_size_per_gpu} × {self.world} GPU(s) is larger "
                                f"than the dataset ({len(dataset)} images); lower the batch size")
        self.iters_per_epoch = self.sampler.batches_per_epoch
        total_batch = cfg.batch_size_per_gpu * self.world
        self.lr_schedule = cosine_schedule(cfg.lr * total_batch / 256.0, cfg.min_lr, cfg.epochs,
                                           self.iters_per_epoch, cfg.warmup_epochs)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, self.iters_per_epoch)
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, self.iters_per_epoch)
        self.optimizer = build_optimizer(cfg.optimizer, param_groups(self.method.student))
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------------------------------- state
    @property
    def step(self) -> int:
        return self.epoch * self.iters_per_epoch + self.batch_in_epoch

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    def _student(self) -> torch.nn.Module:
        s = self.method.student
        return s.module if isinstance(s, torch.nn.parallel.DistributedDataParallel) else s

    def state_dict(self) -> dict[str, Any]:
        student = self._student()
        return {
            "format": "densessl-train/1",
            "method": self.method.name,
            "student": student.state_dict(),
            "teacher": self.method.teacher.state_dict() if self.method.teacher is not None else {},
            "extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "train_config": asdict(self.cfg),
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = path or self.out_dir / CHECKPOINT_NAME
        if self.rank == 0:
            with atomic_path(path) as tmp:
                torch.save(self.state_dict(), tmp)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("method") != self.method.name:
            raise DenseSSLError(f"{path}: checkpoint of method {state.get('method')!r}, but this run trains "
                                f"{self.method.name!r}; delete the file or choose another output directory")
        self._student().load_state_dict(state["student"])
        if self.method.teacher is not None:
            self.method.teacher.load_state_dict(state["teacher"])
        self.method.load_extra_state({k: v.to(self.device) for k, v in state["extra"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    # ----------------------------------------------------------------------------------------- loop
    def _handle_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _loader(self) -> DataLoader:
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size_per_gpu, sampler=self.sampler,
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=True, persistent_workers=False)

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train to the end (or ``max_steps`` more steps, used by tests); resume from the checkpoint if any."""
        checkpoint = self.out_dir / CHECKPOINT_NAME
        if checkpoint.exists():
            self.load_checkpoint(checkpoint)
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        autocast = self.device.type == "cuda" and self.cfg.precision == "bf16"
        steps_done, start = 0, time.time()
        last_loss = math.nan
        try:
            progress = tqdm(total=self.total_steps, initial=self.step, desc=f"pretrain {self.method.name}",
                            disable=None if self.rank == 0 else True, unit="step")
            while self.epoch < self.cfg.epochs:
                for batch in self._loader():
                    it = self.step
                    for i, group in enumerate(self.optimizer.param_groups):
                        group["lr"] = float(self.lr_schedule[it])
                        if i == 0:  # only group 0 follows the weight-decay schedule (DINO)
                            group["weight_decay"] = float(self.wd_schedule[it])
                    batch = _to_device(batch, self.device)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss, logs = self.method.loss(batch, self.epoch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"loss is {loss.item()} at step {it} (epoch {self.epoch}); "
                                                 f"lower train.lr or disable bf16 (train.precision: fp32)")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.cfg.clip_grad > 0:
                        clip_gradients_per_parameter(self._student(), self.cfg.clip_grad)
                    self.method.cancel_gradients(self.epoch)
                    self.optimizer.step()
                    self.method.update_teacher(float(self.momentum_schedule[it]))
                    last_loss = loss.item()
                    self.batch_in_epoch += 1
                    steps_done += 1
                    progress.update(1)
                    if it % self.cfg.log_every_steps == 0 or self.step == self.total_steps:
                        self._log({"step": it, "epoch": self.epoch, "loss": last_loss,
                                   "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]),
                                   "momentum": float(self.momentum_schedule[it]), **logs})
                        progress.set_postfix(loss=f"{last_loss:.3f}")
                    if self._stop_signal is not None:
                        self.save_checkpoint()
                        raise Preempted(f"signal {self._stop_signal} at step {self.step}; checkpoint saved")
                    if self.step % self.cfg.checkpoint_every_steps == 0:
                        self.save_checkpoint()
                    if max_steps is not None and steps_done >= max_steps:
                        self.save_checkpoint()
                        return {"stopped_at_step": self.step, "last_loss": last_loss}
                self.epoch += 1
                self.batch_in_epoch = 0
                self.save_checkpoint()
            progress.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return {"steps": self.total_steps, "last_loss": last_loss, "wall_s": time.time() - start,
                "steps_this_run": steps_done}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
