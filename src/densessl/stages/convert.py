"""Convert stage: training state (or a seeded random init) → exported backbone (safetensors + sidecar)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from densessl import provenance
from densessl.checkpoints.io import save_backbone
from densessl.config import Config
from densessl.errors import CheckpointError
from densessl.io import sha256_file
from densessl.methods import get_method
from densessl.models.backbones import create_backbone


def run_convert(cfg: Config, run_id: str) -> Path:
    started = time.time()
    run = cfg.run(run_id)
    out = cfg.backbone(run)
    if run.is_random_init:
        torch.manual_seed(run.seed)
        backbone = create_backbone(run.arch)  # timm's own initialisation, seeded
        inputs = {"random_init_seed": run.seed}
        source = {"kind": "random-init", "seed": run.seed}
    else:
        final = cfg.final_checkpoint(run)
        if not final.is_file():
            raise CheckpointError(f"{final}: final training state not found; run the pretrain stage for {run.id}")
        state = torch.load(final, map_location="cpu", weights_only=True)
        settings = cfg.pretrain_settings(run)
        method = get_method(run.method)(run.arch, settings["method"], epochs=settings["train"].get("epochs", 1))
        method.student.load_state_dict(state["student"])
        if method.teacher is not None:
            method.teacher.load_state_dict(state["teacher"])
        backbone = method.export_backbone()
        inputs = {"final_checkpoint_sha256": sha256_file(final)}
        source = {"kind": "pretrained", "weights": getattr(method.cfg, "export_weights", "student"),
                  "epoch": int(state["epoch"])}
    save_backbone(out, backbone, run.arch, {}, {
        "run": run.id, "method": run.method, "pretrain_data": run.data, "source": source,
        "provenance": provenance.collect("convert", cfg.hash, inputs, started)})
    return out
