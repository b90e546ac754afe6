"""The trainer's checkpointed state: what a checkpoint holds, writing it, and resuming from the newest usable
one (``checkpointing`` does the files: atomic writes, the previous checkpoint kept, torn-file fallback).

A mixin of ``Trainer`` (train/trainer.py), kept apart so the training loop reads on its own; it uses the
trainer's method, optimiser, schedules, ranks and run log.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from densessl.errors import CheckpointError
from densessl.io import save_torch
from densessl.train import checkpointing
from densessl.train.checkpointing import CHECKPOINT_NAME, DIVERGED_NAME
from densessl.train.run_log import TENSORBOARD_DIR
from densessl.train.stops import NonFiniteLossError


class CheckpointState:
    """``state_dict`` / ``save_checkpoint`` / ``load_checkpoint`` / ``_resume`` of ``Trainer``."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "densessl-train/1",
            "method": self.method.name,
            "student": self._student().state_dict(),
            "teacher": self.method.teacher.state_dict() if self.method.teacher is not None else {},
            "extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.optimizer_name,
            "world_size": self.world,
            "batch_plan": self.batch_plan.as_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_config": asdict(self.cfg),
            "settings": self.settings,
            "settings_hash": checkpointing.settings_hash(self.settings),
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Rank 0 writes atomically, keeping the previous checkpoint; the other ranks return at once (no
        collective here). Non-finite weights are never written as a checkpoint: they go to
        ``checkpoint.diverged.pt`` and the run stops, so the last finite checkpoint stays the one resumed."""
        path = path or self.out_dir / CHECKPOINT_NAME
        if self.rank == 0:
            state = self.state_dict()
            if not checkpointing.weights_finite(state):
                self._diverged(f"weights are non-finite after step {self.step - 1} (epoch {self.epoch})", state)
            if path == self.out_dir / CHECKPOINT_NAME:
                checkpointing.save(state, self.out_dir)
            else:
                save_torch(state, path)
            self.last_checkpoint_step = self.step
            self.run_log.flush()
        return path

    def _diverged(self, what: str, state: dict[str, Any] | None = None) -> NoReturn:
        """Keep the diverged state apart and stop with a message that says how to continue."""
        if self.rank == 0:
            checkpointing.save_diverged(state if state is not None else self.state_dict(), self.out_dir)
        kept = (f"the last finite checkpoint (step {self.last_checkpoint_step}) stays in {CHECKPOINT_NAME}"
                if self.last_checkpoint_step is not None else "no finite checkpoint was written yet")
        raise NonFiniteLossError(f"{what}; the diverged state is in {self.out_dir / DIVERGED_NAME}, {kept}. Lower "
                                 f"train.lr or disable bf16 (train.precision: fp32), then re-run with "
                                 f"--resume-anyway to continue from the finite checkpoint, or --restart")

    def load_checkpoint(self, path: Path, state: dict[str, Any] | None = None) -> None:
        state = state if state is not None else checkpointing.read_verified(path)
        self._check_compatible(path, state)
        self._student().load_state_dict(state["student"])
        if self.method.teacher is not None:
            self.method.teacher.load_state_dict(state["teacher"])
        self.method.load_extra_state({k: v.to(self.device) for k, v in state["extra"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.last_checkpoint_step = self.step

    def _check_compatible(self, path: Path, state: dict[str, Any]) -> None:
        """What no flag can bridge: another method, process count or optimiser state layout."""
        if state.get("method") != self.method.name:
            raise CheckpointError(f"{path}: checkpoint of method {state.get('method')!r}, but this run trains "
                                  f"{self.method.name!r}; re-run with --restart or choose another output directory")
        saved_world = int(state.get("world_size", self.world))
        if saved_world != self.world:
            raise CheckpointError(f"{path}: written by a run on {saved_world} process(es), resumed on {self.world}; "
                                  f"the data shards and lr scaling would change mid-run. Resume with "
                                  f"train.nproc_per_node={saved_world}, or re-run with --restart to start over")
        saved_optimizer = state.get("optimizer_name", self.optimizer_name)
        if saved_optimizer != self.optimizer_name:
            raise CheckpointError(f"{path}: optimiser state of {saved_optimizer!r}, but this run uses "
                                  f"{self.optimizer_name!r}; set train.optimizer: {saved_optimizer} or re-run with "
                                  f"--restart")

    def _resume(self) -> Path | None:
        """Load the newest usable checkpoint of this run if there is one (see ``resume``): the file resumed
        (``checkpoint.previous.pt`` when the newest was torn or corrupt), or None."""
        if self.resume == "restart":
            if self.rank == 0:
                checkpointing.remove_run_state(self.out_dir, TENSORBOARD_DIR)
            self._barrier()
            found = None
        else:
            found = checkpointing.load_latest(self.out_dir)
        if found is not None:
            state, path = found
            self._check_compatible(path, state)
            changes = checkpointing.settings_changes(state.get("settings"), self.settings)
            if changes and self.resume != "anyway":
                raise CheckpointError(
                    f"{path}: checkpoint of other settings ({'; '.join(changes)}); re-run with --resume-anyway to "
                    f"continue its step {int(state['epoch']) * self.iters_per_epoch + int(state['batch_in_epoch'])} "
                    f"with the new settings, or with --restart to train from the start (under Snakemake: "
                    f"DENSESSL_RESUME=anyway or DENSESSL_RESUME=restart in the environment)")
            self.load_checkpoint(path, state)
            if self.rank == 0:
                note = f" with changed settings ({'; '.join(changes)})" if changes else ""
                print(f"resuming from {path} at step {self.step} of {self.total_steps} (epoch {self.epoch}){note}",
                      file=sys.stderr, flush=True)
        self.run_log.truncate_metrics(self.step)
        return found[1] if found is not None else None

