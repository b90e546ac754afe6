"""Resumable training for the fine-tuning evaluations (Segmenter linear decoder, iNat fine-tuning).

At paper scale these run for hours on preemptible SLURM nodes. A resumed run must equal the uninterrupted one,
so data order and augmentation are functions of (seed, epoch, index) only, each step re-seeds the RNGs from
(seed, step), and the saved state (model, optimizer, progress) is loaded only by the same run: same protocol,
same config up to fields that do not change the weights, same starting backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from densessl.train.checkpointing import previous_of, save_keeping_previous
from densessl.train.sampling import EpochPermutationSampler, SeededAugmentation
from densessl.train.signals import StopSignals, ignore_stop_signals
from densessl.train.trainer import Preempted

__all__ = ["ResumableBatches", "StopSignals", "TrainState", "open_train_state", "seed_step"]

log = logging.getLogger(__name__)


STATE_FORMAT = "densessl-eval-train-state/1"
# Config fields that do not change the trained weights, so a state saved under other values of them still
# belongs to the same run: checkpoint_every, num_workers (data order and augmentation do not depend on the
# worker count) and eval_batch_size (evaluation only; batching may move its floats in the last bits).
RESUME_NEUTRAL_FIELDS = frozenset({"checkpoint_every", "num_workers", "eval_batch_size"})


def config_fingerprint(cfg: Any, neutral: frozenset[str] = RESUME_NEUTRAL_FIELDS) -> str:
    """sha256 of ``asdict(cfg)`` without the ``neutral`` fields: equal exactly when two runs train the same."""
    values = {k: v for k, v in asdict(cfg).items() if k not in neutral}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``module``'s state: identifies the starting backbone
    without trusting file names (the same path may hold a re-exported backbone after a resumed pretraining)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def seed_step(seed: int, step: int) -> None:
    """Seed python/numpy/torch from (seed, step) before a training step.

    Drop-path (and iNat's mixup/cutmix) then draw the same numbers at step t whether or not the run was
    resumed, and whatever the data loading did to the global RNGs in between; no RNG state has to be saved.
    """
    value = int.from_bytes(hashlib.sha256(f"train-step:{seed}:{step}".encode()).digest()[:8], "little") >> 1
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _unchanged(item: Any) -> Any:
    """Identity transform for ``SeededAugmentation``: the wrapped datasets augment in their own __getitem__."""
    return item


class ResumableBatches:
    """Training batches whose order and augmentation are functions of (seed, epoch, index) only.

    Replaces ``DataLoader(shuffle=True, generator=...)``, whose order after a restart would depend on how many
    batches the killed run had drawn. Each epoch gets a fresh DataLoader (``persistent_workers`` off), created
    after the epoch is set on dataset and sampler, so worker processes see the right epoch too. Workers ignore
    the stop signals (``densessl.train.signals``): a signal to the whole process group reaches the loop's
    :class:`StopSignals`, which saves the state, instead of killing the workers first.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int, pin_memory: bool,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.items = SeededAugmentation(dataset, _unchanged, seed)
        self.sampler = EpochPermutationSampler(len(dataset), batch_size, seed)  # type: ignore[arg-type]
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.collate_fn = collate_fn  # None: torch's default; detection batches are lists of differently sized images

    @property
    def per_epoch(self) -> int:
        """Full batches per epoch (the last partial batch is dropped)."""
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """Batches ``start_batch``, ``start_batch + 1``, ... of ``epoch``."""
        self.items.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(self.items, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=False,
                          collate_fn=self.collate_fn, worker_init_fn=ignore_stop_signals)

    def from_step(self, step: int) -> Iterator[Any]:
        """Endless batches starting at global batch ``step`` (close the generator to stop its workers)."""
        epoch, start = divmod(step, self.per_epoch)
        while True:
            yield from self.epoch(epoch, start)
            epoch, start = epoch + 1, 0


class TrainState:
    """One evaluation run's training state on disk: written atomically with the previous one kept, loaded only
    if it belongs to this run.

    "This run" means the same protocol, the same config up to :data:`RESUME_NEUTRAL_FIELDS` and the same
    starting backbone weights. Continuing any other state would silently mix two runs, so it is ignored with
    a warning (and overwritten by the next save). The file can be GBs at paper scale: :meth:`discard` it once
    the metrics exist.
    """

    def __init__(self, path: Path, protocol: str, cfg: Any, backbone: nn.Module) -> None:
        self.path = Path(path)
        self.identity = {"format": STATE_FORMAT, "protocol": protocol, "config": config_fingerprint(cfg),
                         "backbone": module_fingerprint(backbone)}
        self.resumed_from: Path | None = None  # the file load() returned

    @property
    def previous_path(self) -> Path:
        """The state before the newest (``train_state.previous.pt``), kept for when the newest is torn."""
        return previous_of(self.path)

    def load(self) -> dict[str, Any] | None:
        """The newest saved state of this run (tensors on CPU): ``path``, or the previous one when the newest
        is unreadable (torn by a kill or a full disk) or another run's; None when neither is usable."""
        for path in (self.path, self.previous_path):
            if not path.is_file():
                continue
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
                log.warning("%s: unreadable training state (%s: %s); skipping it", path, type(exc).__name__,
                            (str(exc).splitlines() or [""])[0])
                continue
            found = saved.get("identity", {}) if isinstance(saved, dict) else {}
            differ = [key for key, value in self.identity.items() if found.get(key) != value]
            if differ:
                log.warning("%s: training state of a different run (%s differ); skipping it", path, ", ".join(differ))
                continue
            log.info("%s: resuming the saved training state%s", path,
                     " (the newest was not usable)" if path != self.path else "")
            self.resumed_from = path
            return saved
        if self.path.is_file() or self.previous_path.is_file():
            log.warning("%s: no usable training state; training from the start", self.path)
        return None

    def save(self, state: dict[str, Any]) -> None:
        save_keeping_previous({**state, "identity": self.identity}, self.path)

    def preempt(self, state: dict[str, Any], signum: int, where: str) -> NoReturn:
        """Save, then raise ``Preempted`` (the CLI turns it into ``REQUEUE_EXIT_CODE`` for the launcher)."""
        self.save(state)
        raise Preempted(f"signal {signum} {where}; training state saved to {self.path}")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.previous_path.unlink(missing_ok=True)


def open_train_state(path: Path | None, protocol: str, cfg: Any, backbone: nn.Module) -> TrainState | None:
    """A :class:`TrainState` when the caller asked for one (fingerprinting the backbone costs a pass over it)."""
    return None if path is None else TrainState(path, protocol, cfg, backbone)
