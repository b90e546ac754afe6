"""Pretraining checkpoints on disk: written atomically with one previous kept, verified before use, tied to
the settings that define the run.

Files in a run directory:

* ``checkpoint.pt`` — the newest state. Written to a temporary file first; only when that is complete the old
  newest becomes ``checkpoint.previous.pt`` and the new file takes its name, so at every moment one complete
  state exists (a kill between the two renames leaves only the previous one, which resume then uses).
* ``checkpoint.previous.pt`` — the state before it: used when the newest cannot be read (a torn or corrupt
  file, e.g. a full disk on a file system that does not report it) or holds non-finite weights.
* ``checkpoint.diverged.pt`` — the state at a non-finite loss, kept apart for inspection; it is never resumed,
  so a re-run with a lower learning rate continues from the last finite checkpoint.

The run-defining settings (method, its config, the train config less the fields that do not change the
weights, the number of images) are stored in each checkpoint with their hash. Resume refuses a checkpoint of
other settings and names the fields that changed, unless asked to continue anyway or to start over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from densessl.errors import CheckpointError
from densessl.io import atomic_path, torch_save_to

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.previous.pt"  # previous_of(CHECKPOINT_NAME)
DIVERGED_NAME = "checkpoint.diverged.pt"
FORMAT = "densessl-train/1"
REQUIRED_KEYS = ("format", "method", "student", "teacher", "extra", "optimizer", "epoch", "batch_in_epoch")
# TrainConfig fields that do not change the weights: a checkpoint written under other values of them belongs to
# the same run (data order and augmentation are functions of (seed, epoch, index), not of the worker count).
# compile and fused_adamw change how the step is computed (kernel fusion: rounding only), finite_check_every
# when the loss is read back: turning them on or off mid-run continues the same run.
RESUME_NEUTRAL_FIELDS = frozenset({"num_workers", "log_every_steps", "checkpoint_every_steps", "tensorboard",
                                   "compile", "fused_adamw", "finite_check_every"})
RESUME_MODES = ("auto", "anyway", "restart")
RESUME_ENV = "DENSESSL_RESUME"  # default of --resume-anyway / --restart, for runs started by Snakemake
log = logging.getLogger(__name__)


def run_settings(method_name: str, method_cfg: Any, train_cfg: Any, images: int) -> dict[str, Any]:
    """What defines a run's weights: recorded in every checkpoint and compared on resume."""
    method_values = dataclasses.asdict(method_cfg) if dataclasses.is_dataclass(method_cfg) else {}
    train_values = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in RESUME_NEUTRAL_FIELDS}
    return json.loads(json.dumps({"method": method_name, "method_config": method_values, "train": train_values,
                                  "images": images}, default=str))


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def settings_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``["train.lr: 0.002 -> 0.001", ...]``; one entry when the checkpoint recorded no settings at all."""
    if not isinstance(saved, dict):
        return ["(the checkpoint records no settings)"]
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changes.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return changes


def weights_finite(state: dict[str, Any]) -> bool:
    """Every floating tensor of the student and teacher is finite."""
    for part in ("student", "teacher"):
        for tensor in (state.get(part) or {}).values():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return False
    return True


def previous_of(path: Path) -> Path:
    """Where :func:`save_keeping_previous` keeps the state before ``path``: ``x.pt`` → ``x.previous.pt``."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_keeping_previous(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically; the file it replaces becomes :func:`previous_of` ``path``, but
    only once the new one is complete (a kill in between leaves the previous one, never a torn newest alone)."""
    with atomic_path(path) as tmp:
        torch_save_to(state, tmp)
        if path.exists():
            os.replace(path, previous_of(path))
    return path


def save(state: dict[str, Any], out_dir: Path) -> Path:
    """Write ``state`` as the newest checkpoint, keeping the one before it as ``checkpoint.previous.pt``."""
    return save_keeping_previous(state, out_dir / CHECKPOINT_NAME)


def save_diverged(state: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / DIVERGED_NAME
    with atomic_path(path) as tmp:
        torch_save_to(state, tmp)
    return path


def read_verified(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` if it is complete, of this format and holds finite weights; else
    :class:`CheckpointError` saying what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        size = path.stat().st_size
        detail = (str(exc).splitlines() or [f"cut short at {size} bytes" if size else "empty file"])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a densessl training checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    if not weights_finite(state):
        raise CheckpointError(f"{path}: holds non-finite weights")
    return state


def load_latest(out_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies (falling back to the previous one), or None when there is none.

    Raises :class:`CheckpointError` when checkpoints exist but none can be used."""
    candidates = [p for p in (out_dir / CHECKPOINT_NAME, out_dir / PREVIOUS_NAME) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            state = read_verified(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s (%s)", path, problems[0])
        return state, path
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}; no usable checkpoint is left: re-run with --restart to "
                              f"train from the start (or DENSESSL_RESUME=restart when Snakemake runs it)")
    return None


def remove_run_state(out_dir: Path, tensorboard_dir: str) -> None:
    """Delete what a previous attempt left (checkpoints, metrics, TensorBoard events): ``--restart``."""
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME, DIVERGED_NAME, "metrics.jsonl"):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / tensorboard_dir, ignore_errors=True)

