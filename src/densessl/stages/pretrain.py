"""Pretrain stage: train one (method, arch, data) run to its final training state."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from densessl import provenance
from densessl.config import Config
from densessl.data.imagenet import pretraining_images
from densessl.data.manifest import data_root
from densessl.io import atomic_path, read_json, write_json
from densessl.methods import get_method
from densessl.methods.base import build_dataclass
from densessl.train.checkpointing import CHECKPOINT_NAME
from densessl.train.run_log import last_attempt
from densessl.train.trainer import TrainConfig, Trainer


def resume_mode(requested: str, out_dir: Path, final: Path) -> str:
    """``requested`` ("auto", "anyway", "restart"), except that a finished run whose ``final.pt`` is gone
    starts over: Snakemake deletes a job's outputs before running it, so this is what ``snakemake --forcerun``
    (or deleting final.pt) on a finished run looks like, and resuming would only relabel the old weights."""
    last = last_attempt(out_dir)
    if requested == "auto" and last is not None and last.get("event") == "finished" and not final.exists():
        print(f"{out_dir}: the run had finished but {final.name} is gone (snakemake --forcerun, or deleted): "
              f"training again from the start", file=sys.stderr, flush=True)
        return "restart"
    return requested


def run_pretrain(cfg: Config, run_id: str, resume: str = "auto") -> Path:
    """Train ``run_id``; ``resume`` as ``Trainer``: "auto" (continue the same settings), "anyway", "restart"."""
    started = time.time()
    run = cfg.run(run_id)
    settings = cfg.pretrain_settings(run)
    settings["train"].update(process_layout())
    train_cfg = build_dataclass(TrainConfig, settings["train"], f"pretrain.{run.method}.train")
    torch.manual_seed(train_cfg.seed)  # the initial weights are part of the run: same seed, same run
    method = get_method(run.method)(run.arch, settings["method"], epochs=train_cfg.epochs)
    manifest = cfg.data_manifest(run.data)
    dataset = pretraining_images(run.data, data_root(manifest), max_items=train_cfg.max_train_images,
                                 labels=method.labels)
    if method.labels is not None:
        method.check_classes(dataset.num_classes, str(manifest))
    out_dir = cfg.pretrain_dir(run)
    final = cfg.final_checkpoint(run)
    trainer = Trainer(method, dataset, train_cfg, out_dir, resume=resume_mode(resume, out_dir, final))
    summary = trainer.fit()
    if trainer.rank == 0:
        with atomic_path(final) as tmp:
            shutil.copyfile(out_dir / CHECKPOINT_NAME, tmp)
        write_json(out_dir / "train_summary.json", {
            "run": run.id, "method_config": settings["method"], "train_config": settings["train"],
            "images": len(dataset), "iters_per_epoch": trainer.iters_per_epoch, **summary,
            "provenance": provenance.collect("pretrain", cfg.hash, {
                "data": read_json(manifest)["fingerprint"]}, started)})
    if torch.distributed.is_initialized():
        # the other ranks wait for rank 0's final.pt: under srun the first task to end starts the step's
        # shutdown clock (launch/srun.py, --wait)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


def process_layout(env: dict[str, str] | None = None) -> dict[str, int]:
    """``{nodes, nproc_per_node}`` of the processes this run was started on (torchrun's or srun's variables), so
    that the run records the layout it used; {} for a single process (the configured values stay)."""
    env = dict(os.environ) if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return {}
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    if per_node < 1 or world % per_node:
        return {"nodes": 1, "nproc_per_node": world}
    return {"nodes": world // per_node, "nproc_per_node": per_node}


def pretrain_nproc(cfg: Config, run_id: str) -> int:
    """Processes for this run: train.nproc_per_node, else one per GPU of the job, 1 on CPU."""
    from densessl.train.launch import resolve_nproc

    run = cfg.run(run_id)
    train_cfg = build_dataclass(TrainConfig, cfg.pretrain_settings(run)["train"], f"pretrain.{run.method}.train")
    return resolve_nproc(train_cfg.nproc_per_node)
