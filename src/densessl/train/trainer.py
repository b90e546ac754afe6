"""The one trainer every pretraining method shares.

What it guarantees: per-iteration schedules as DINO's ``cosine_scheduler``; the official update order
(backward → per-parameter clipping → cancel frozen grads → step → teacher EMA, facebookresearch/dino
``main_dino.py`` ``train_one_epoch``);
atomic checkpoints every N steps and at every epoch end, the previous one kept (``checkpointing``); resume
that continues the exact same run (data order and augmentations are functions of (seed, epoch, index); the RNG
is re-seeded from (seed, rank, step) before every step, so no RNG state has to survive) and refuses a
checkpoint of other settings; SIGTERM/SIGINT/SIGUSR1, to this process or its whole group (DataLoader workers
ignore them, ``signals``) → checkpoint and exit with ``REQUEUE_EXIT_CODE``; a non-finite loss stops the run
with the step named and the diverged state kept apart from the last finite checkpoint; metrics as JSONL and
TensorBoard scalars (``run_log``).

No host synchronisation per step: the loss is checked for NaN/Inf on the device (``finite_check``) and read
every ``train.finite_check_every`` steps and before every checkpoint; losses and method logs are read back only
at ``train.log_every_steps``. ``train.compile`` compiles the method's loss, ``train.fused_adamw`` fuses AdamW's
update on CUDA, bf16 autocast runs on CUDA (``train.precision``), ``train.channels_last`` lays out weights and
images channels-last (docs/performance.md, "Step settings").

Hooks a method class may define (all optional; ``PretrainMethod`` documents the required ones):

* ``optimizer_name: ClassVar[str]`` — the optimiser used when ``train.optimizer`` is null (CLoVE: "lars").
* ``param_groups(self) -> list[dict]`` — optimiser groups over ``self.student``'s trainable parameters
  (default: DINO's ``get_params_groups``). A group may carry ``lr_scale`` (multiplies the scheduled lr) and
  ``wd_schedule`` (False keeps its weight decay fixed; default: scheduled unless the group sets
  ``weight_decay=0``).
* ``find_unused_parameters: ClassVar[bool]`` — DDP must tolerate parameters without gradient on some steps.
* ``sync_batchnorm: ClassVar[bool | None]`` — None (default): convert BatchNorm to SyncBatchNorm when the
  method has any, as DINO's ``main_dino.py`` (``utils.has_batchnorms`` → ``convert_sync_batchnorm``) does for
  student and teacher; False: never; True: always (same as None when BN is present).

Multi-GPU: started by torchrun (see ``densessl.train.launch``) the trainer joins the process group (NCCL on
CUDA, gloo on CPU), wraps ``method.student`` in DistributedDataParallel for the duration of ``fit`` (so a
method's ``export_backbone`` sees its plain modules afterwards), shards the data per rank
(``EpochPermutationSampler``), scales the lr with the global batch, writes checkpoints/logs on rank 0 only,
makes all ranks agree on stopping (signal or non-finite loss) through one small all-reduce every
``finite_check_every`` steps and before every checkpoint (a stop signal is acted on at the next such step), checks
that the replicas hold identical weights after the first step and at every checkpoint, and ends ``fit`` with
a barrier.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from densessl.errors import ConfigError, DenseSSLError
from densessl.launch.batch_rule import BatchPlan, Recipe, plan_batch
from densessl.methods.base import PretrainMethod
from densessl.progress import Progress
from densessl.train import checkpointing
from densessl.train.checkpointing import CHECKPOINT_NAME
from densessl.train.data_path import build_data_path
from densessl.train.distributed import (
    broadcast_state,
    init_distributed,
    pick_device,
    sync_batchnorm,
)
from densessl.train.finite_check import FiniteLossRecord
from densessl.train.launch import REQUEUE_EXIT_CODE
from densessl.train.optim import (
    CLIP_MODES,
    OPTIMIZERS,
    _method_param_groups,
    build_optimizer,
    clip_gradients,
    clip_gradients_global_norm,
    clip_gradients_per_parameter,
    param_groups,
    resolve_optimizer_name,
)
from densessl.train.run_log import RunLog
from densessl.train.sampling import EpochPermutationSampler
from densessl.train.schedules import cosine_schedule
from densessl.train.signals import STOP_SIGNALS, ignore_stop_signals
from densessl.train.step_inputs import batch_to_device, group_micro_batches, logs_as_floats
from densessl.train.stops import NonFiniteLossError, Preempted
from densessl.train.train_config import TrainConfig
from densessl.train.trainer_collectives import RankAgreement
from densessl.train.trainer_state import CheckpointState

__all__ = ["CHECKPOINT_NAME", "CLIP_MODES", "OPTIMIZERS", "REQUEUE_EXIT_CODE", "NonFiniteLossError", "Preempted",
           "TrainConfig", "Trainer", "build_optimizer", "clip_gradients", "clip_gradients_global_norm",
           "clip_gradients_per_parameter", "param_groups", "pick_device", "resolve_optimizer_name"]



def _step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct RNG seed per (run seed, rank, step): dropout/drop-path of step t never depend on resume."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2**63 - 1)


class Trainer(CheckpointState, RankAgreement):
    """A method trained on a dataset under ``TrainConfig``; checkpoint state in ``CheckpointState``
    (train/trainer_state.py), agreement between processes in ``RankAgreement`` (train/trainer_collectives.py)."""

    def __init__(self, method: PretrainMethod, dataset: Any, cfg: TrainConfig, out_dir: str | Path,
                 device: str | None = None, resume: str = "auto"):
        """``resume``: "auto" continues a checkpoint of the same settings and refuses one of others, "anyway"
        continues it with the new settings, "restart" deletes the run's state and trains from step 0."""
        if resume not in checkpointing.RESUME_MODES:
            raise ConfigError(f"resume={resume!r}; allowed values: {', '.join(checkpointing.RESUME_MODES)}")
        self.cfg = cfg
        self.resume = resume
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.device = init_distributed(device)
        if cfg.nproc_per_node is not None:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            if per_node != cfg.nproc_per_node:
                raise ConfigError(f"train.nproc_per_node={cfg.nproc_per_node}, but this run has {per_node} process(es) "
                                  f"on the node; start it with `python -m densessl pretrain` (densessl.train.launch) "
                                  f"or torchrun --nproc_per_node {cfg.nproc_per_node}, or set nproc_per_node: null")
        self.batch_plan = _batch_plan(method.name, cfg, self.world)
        self.accumulation = self.batch_plan.accumulation_steps
        micro = self.batch_plan.batch_size_per_gpu
        if cfg.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision: {cfg.precision!r}; allowed values: bf16, fp32")
        if cfg.finite_check_every < 1:
            raise ConfigError(f"train.finite_check_every: {cfg.finite_check_every}; must be at least 1 (1 reads the "
                              f"loss back every step)")
        if cfg.clip_mode not in CLIP_MODES:
            raise ConfigError(f"train.clip_mode: {cfg.clip_mode!r}; allowed values: {', '.join(CLIP_MODES)} "
                              f"(DINO, SelfPatch, GTSA: per_parameter; LOCA: global_norm)")
        torch.manual_seed(cfg.seed + self.rank)
        self.method = method.to(self.device)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        sync_batchnorm(self.method, self.world, self.device, self.rank, micro)
        broadcast_state(self.method, self.world)
        # train.data_path: views made in the DataLoader workers (cpu) or on the training device (device)
        self.data_path = build_data_path(cfg.data_path, dataset, method.views(), cfg.seed, self.device, method.name)
        self.dataset = self.data_path.dataset
        # (epoch, index) pairs: persistent workers keep their dataset copy across epochs
        self.sampler = EpochPermutationSampler(len(dataset), micro, cfg.seed, self.rank, self.world,
                                               accumulation=self.accumulation, with_epoch=True)
        self._data_loader: DataLoader | None = None
        self.total_batch = self.batch_plan.batch_size
        if self.sampler.batches_per_epoch == 0:
            raise DenseSSLError(f"a step of {self.total_batch} images (per-GPU batch {micro} × {self.world} GPU(s) × "
                                f"accumulation {self.accumulation}) is larger than the dataset ({len(dataset)} images); "
                                f"lower train.batch_size or train.batch_size_per_gpu")
        self.iters_per_epoch = self.sampler.batches_per_epoch // self.accumulation  # optimiser steps
        peak = self.batch_plan.lr  # each official code's rule on the effective batch (launch/batch_rule.py)
        final = peak * cfg.min_lr_factor if cfg.min_lr_factor is not None else cfg.min_lr
        self.lr_schedule = cosine_schedule(peak, final, cfg.epochs, self.iters_per_epoch, cfg.warmup_epochs,
                                           start_warmup_value=peak * cfg.warmup_start_factor)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, self.iters_per_epoch)
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, self.iters_per_epoch)
        self.optimizer_name = resolve_optimizer_name(cfg.optimizer, method)
        self.optimizer = build_optimizer(self.optimizer_name, _method_param_groups(method, self.method.student),
                                         fused=cfg.fused_adamw and self.device.type == "cuda")
        self.autocast = self.device.type == "cuda" and cfg.precision == "bf16"
        self.finite = FiniteLossRecord(self.device)
        self._compiled_loss: Callable[..., Any] | None = None
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stop_signal: int | None = None
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self.run_log = RunLog(self.out_dir, self.rank, cfg.tensorboard)
        self.settings = checkpointing.run_settings(method.name, getattr(method, "cfg", None), cfg, len(dataset))
        for key, default in (("batch_size", None), ("nodes", 1), ("data_path", "cpu")):  # at these values the
            if self.settings["train"].get(key) == default:  # fields change nothing: checkpoints from before them
                self.settings["train"].pop(key, None)       # still resume
        self.last_checkpoint_step: int | None = None

    # ----------------------------------------------------------------------------------------- setup
    def _wrap_student(self) -> None:
        if self.world == 1:
            return
        if self._ddp is None:
            kwargs: dict[str, Any] = {
                "find_unused_parameters": bool(getattr(self.method, "find_unused_parameters", False))}
            if self.device.type == "cuda":
                kwargs["device_ids"] = [self.device.index]
            self._ddp = nn.parallel.DistributedDataParallel(self.method.student, **kwargs)
        self.method.student = self._ddp

    def _unwrap_student(self) -> None:
        if self._ddp is not None:
            self.method.student = self._ddp.module

    # ----------------------------------------------------------------------------------------- state
    @property
    def step(self) -> int:
        return self.epoch * self.iters_per_epoch + self.batch_in_epoch

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    def _student(self) -> nn.Module:
        s = self.method.student
        return s.module if isinstance(s, nn.parallel.DistributedDataParallel) else s

    # ----------------------------------------------------------------------------------------- loop
    def _handle_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _loader(self) -> Iterator[Any]:
        """This epoch's batches from where the last step left off, made by ``train.data_path``. One DataLoader
        for the whole ``fit``: its workers persist across epochs (the sampler tells them the epoch)."""
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.accumulation)
        if self._data_loader is None:
            workers = self.cfg.num_workers
            self._data_loader = DataLoader(
                self.dataset, batch_size=self.batch_plan.batch_size_per_gpu, sampler=self.sampler,
                num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=True,
                collate_fn=self.data_path.collate_fn, persistent_workers=workers > 0,
                worker_init_fn=ignore_stop_signals)
        return self.data_path.batches(self._data_loader)

    def train_step(self, batch: Any, it: int) -> tuple[torch.Tensor, dict[str, Any], bool]:
        """One optimisation step on one batch at global iteration ``it``: (this process's loss as a 0-dim tensor
        on the device, method logs as floats or 0-dim tensors, stop now?). Nothing is read back from the device
        except at finiteness checks; ``float()`` the results to read them. Used by benchmarks/train_step.py, so
        the benchmark times exactly the path ``fit`` takes."""
        return self.train_step_accumulated([batch], it)

    def _loss_fn(self) -> Callable[..., Any]:
        """The method's loss, compiled once on first use with ``train.compile`` (after the DDP wrap, which the
        compiled code then calls through ``self.student``)."""
        if not self.cfg.compile:
            return self.method.loss
        if self._compiled_loss is None:
            self._compiled_loss = torch.compile(self.method.loss)
        return self._compiled_loss

    def train_step_accumulated(self, micro_batches: list[Any], it: int) -> tuple[torch.Tensor, dict[str, Any], bool]:
        """One optimisation step over ``accumulation`` micro-batches: each loss / their number is back-propagated
        (DDP all-reduces on the last one only), then one clip, step and teacher update, as CLoVE's
        ``main_pretrain.py`` does with ``--grad-accumulation-steps``. With one micro-batch this is the official
        step exactly. What a method computes from its batch alone (DINO's centre, LOCA's Sinkhorn, BatchNorm)
        sees one micro-batch over all GPUs (docs/operations.md). A non-finite loss is recorded on the device
        and raised at the next check (``_agree``); the step itself still runs."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[it]) * group.get("lr_scale", 1.0)
            if group.get("wd_schedule", True):  # DINO: only the regularised group follows the schedule
                group["weight_decay"] = float(self.wd_schedule[it])
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro_batches)
        losses: list[torch.Tensor] = []
        sums: dict[str, Any] = {}
        loss_fn = self._loss_fn()
        for i, batch in enumerate(micro_batches):
            # micro-batch 0 keeps the seed of an unaccumulated step; the others get seeds no rank uses
            torch.manual_seed(_step_seed(self.cfg.seed, self.rank + i * self.world, it))
            batch = batch_to_device(batch, self.device, self.cfg.channels_last)
            last = i == count - 1
            with nullcontext() if last or self._ddp is None else self._ddp.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss, logs = loss_fn(batch, self.epoch)
                self.finite.note(loss, it)
                (loss / count if count > 1 else loss).backward()
            losses.append(loss.detach().float())
            for key, value in logs.items():  # tensors stay on the device until a log step reads them
                sums[key] = sums[key] + value if key in sums else value
        if self.cfg.clip_grad > 0:
            clip_gradients(self._student(), self.cfg.clip_grad, self.cfg.clip_mode)
        self.method.cancel_gradients(self.epoch)
        self.optimizer.step()
        self.method.update_teacher(float(self.momentum_schedule[it]))
        stop = self._agree(it)
        loss = losses[0] if count == 1 else torch.stack(losses).mean()
        return loss, {k: v / count if count > 1 else v for k, v in sums.items()}, stop

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train to the end (or ``max_steps`` more steps, used by tests); resume from the checkpoint if any."""
        resumed = self._resume()
        self.run_log.attempt({"event": "start", "step": self.step, "resumed": resumed is not None,
                             "checkpoint": resumed.name if resumed is not None else None,
                             "restart": self.resume == "restart"})
        previous = {s: signal.signal(s, self._handle_signal) for s in STOP_SIGNALS}
        steps_done, start = 0, time.time()
        last_loss: torch.Tensor | None = None
        try:
            self._wrap_student()
            self.run_log.open_tensorboard(self.step)
            # a bar on a terminal, else a line every DENSESSL_PROGRESS_INTERVAL s in the stage's log (rank 0)
            progress = Progress(f"pretrain {self.method.name}", self.total_steps, initial=self.step,
                                items_per_step=self.total_batch, bar=True, enabled=self.rank == 0)
            clock, steps_since_log = time.perf_counter(), 0
            logged_loss: float | None = None
            while self.epoch < self.cfg.epochs:
                for micro_batches in group_micro_batches(self._loader(), self.accumulation):
                    it = self.step
                    last_loss, logs, stop = self.train_step_accumulated(micro_batches, it)
                    self.batch_in_epoch += 1
                    steps_done += 1
                    steps_since_log += 1
                    if steps_done == 1 and self.world > 1:
                        self._agree(it, force=True)  # NaN weights would read as replicas out of sync
                        self.check_replicas_in_sync(it)
                    if it % self.cfg.log_every_steps == 0 or self.step == self.total_steps:
                        loss_value = self._mean_over_ranks(last_loss)  # the only reads of a step's results
                        logged_loss = loss_value
                        now = time.perf_counter()
                        self.run_log.metrics({"step": it, "epoch": self.epoch, "loss": loss_value,
                                   "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]),
                                   "momentum": float(self.momentum_schedule[it]), **logs_as_floats(logs),
                                   "images_per_s": steps_since_log * self.total_batch / max(now - clock, 1e-9)})
                        clock, steps_since_log = now, 0
                    # the loss shown is the newest one read (log_every_steps), so a line never forces a GPU sync
                    info: dict[str, Any] = {"epoch": (self.epoch + 1, self.cfg.epochs)}
                    if logged_loss is not None:
                        info["loss"] = logged_loss
                    info["lr"] = float(self.lr_schedule[it])
                    progress.update(1, **info)
                    if stop:
                        self._agree(it, force=True)  # a stop never checkpoints past a non-finite step
                        self.save_checkpoint()
                        self._barrier()
                        message = f"signal {self._stop_signal or 'on another rank'} at step {self.step}; checkpoint saved"
                        self.run_log.attempt({"event": "preempted", "step": self.step,
                                              "signal": signal.Signals(self._stop_signal).name
                                              if self._stop_signal else "on another rank"})
                        raise Preempted(message)
                    if self.step % self.cfg.checkpoint_every_steps == 0:
                        self._agree(it, force=True)
                        self.check_replicas_in_sync(it)
                        self.save_checkpoint()
                    if max_steps is not None and steps_done >= max_steps:
                        self._agree(it, force=True)
                        self.check_replicas_in_sync(it)
                        self.save_checkpoint()
                        self._barrier()
                        self.run_log.attempt({"event": "paused", "step": self.step})
                        return {"stopped_at_step": self.step, "last_loss": self._mean_over_ranks(last_loss)}
                self.epoch += 1
                self.batch_in_epoch = 0
                self._agree(self.step - 1, force=True)
                self.check_replicas_in_sync(self.step - 1)
                self.save_checkpoint()
            progress.finish()
            self._barrier()
            self.run_log.attempt({"event": "finished", "step": self.step, "steps_this_run": steps_done})
        except Exception as exc:
            try:
                self._non_finite_before(exc)
            except NonFiniteLossError as named:
                self.run_log.attempt({"event": "failed", "step": self.step, "error": f"NonFiniteLossError: {named}"})
                raise named from exc
            if not isinstance(exc, Preempted):  # recorded above, with its signal
                self.run_log.attempt({"event": "failed", "step": self.step, "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.run_log.close()
            self._unwrap_student()
            self._data_loader = None  # ends persistent workers
        final_loss = self._mean_over_ranks(last_loss) if last_loss is not None else math.nan
        return {"steps": self.total_steps, "last_loss": final_loss, "wall_s": time.time() - start,
                "steps_this_run": steps_done, "batch_plan": self.batch_plan.as_dict()}


def _batch_plan(method: str, cfg: TrainConfig, world: int) -> BatchPlan:
    """The per-GPU batch, accumulation and lr of this run on its ``world`` processes (launch/batch_rule.py)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes, per_node = (world // per_node, per_node) if per_node > 0 and world % per_node == 0 else (1, world)
    return plan_batch(Recipe.from_train(method, asdict(cfg)), nodes, per_node)
