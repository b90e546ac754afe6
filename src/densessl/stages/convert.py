"""Convert stage: training state (or a seeded random init) → exported backbone (safetensors + sidecar)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from densessl import provenance
from densessl.checkpoints.io import save_backbone
from densessl.config import Config, Run
from densessl.errors import CheckpointError
from densessl.io import sha256_file
from densessl.methods import get_method
from densessl.models.backbones import create_backbone
from densessl.models.variants import variant_init_kwargs, variant_kwargs


def run_convert(cfg: Config, run_id: str) -> Path:
    started = time.time()
    run = cfg.run(run_id)
    out = cfg.backbone(run)
    if run.released:
        backbone, arch_kwargs, inputs, source = _import_released(cfg, run)
    elif run.is_random_init:
        backbone, arch_kwargs = random_init_backbone(run.arch, run.variant, run.seed)
        inputs = {"random_init_seed": run.seed}
        source = {"kind": "random-init", "seed": run.seed, "variant": run.variant}
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
        # the method's architecture variant (e.g. LOCA: no class token, tanh GELU), so the sidecar rebuilds it
        arch_kwargs = dict(getattr(method, "arch_kwargs", {}))
        inputs = {"final_checkpoint_sha256": sha256_file(final)}
        source = {"kind": "pretrained", "weights": getattr(method.cfg, "export_weights", "student"),
                  "epoch": int(state["epoch"])}
    save_backbone(out, backbone, run.arch, arch_kwargs, {
        "run": run.id, "method": run.method, "pretrain_data": run.data, "source": source,
        "provenance": provenance.collect("convert", cfg.hash, inputs, started)})
    return out


def random_init_backbone(arch: str, variant: str | None, seed: int) -> tuple[torch.nn.Module, dict]:
    """The network the compared method starts from (its architecture variant, drawn with its initialisation
    after ``torch.manual_seed(seed)``, as the pretrain stage seeds), and the architecture kwargs to store."""
    arch_kwargs: dict = variant_kwargs(variant)
    torch.manual_seed(seed)
    return create_backbone(arch, **arch_kwargs, **variant_init_kwargs(variant)), arch_kwargs


def _import_released(cfg: Config, run: Run) -> tuple[torch.nn.Module, dict, dict, dict]:
    """An official released checkpoint (a local file, or downloaded) checked against its pinned or recorded
    SHA-256 (checkpoints/released.py) → our backbone."""
    from densessl.checkpoints.importers import IMPORTERS, import_checkpoint
    from densessl.checkpoints.released import obtain

    spec = cfg.released_spec(run)
    got = obtain(spec, run.id, cfg.release_download_path(run), cfg.released_lock, cfg.preset)
    options = dict(spec.get("options") or {})
    backbone = import_checkpoint(spec["format"], got.path, run.arch, **options)
    arch_kwargs = dict(IMPORTERS[spec["format"]].arch_kwargs or {})
    source = {"kind": "released", "format": spec["format"], "file": str(got.path), "url": spec.get("url"),
              "page": spec.get("page"), "file_sha256": got.sha256, "options": options, **got.provenance()}
    return backbone, arch_kwargs, {"released_sha256": got.sha256}, source
