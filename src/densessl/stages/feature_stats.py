"""`python -m densessl feature-stats`: the diagnostics behind docs/learning_signal.md, for every
exported backbone of the configuration (effective rank, colour-explained and position shares of the patch
tokens on the first images of the Patch-Seg validation split)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from densessl.checkpoints.io import load_backbone
from densessl.config import EVALUATIONS, Config
from densessl.data.manifest import data_root
from densessl.errors import ConfigError
from densessl.evaluate.feature_stats import colour_explained_share, effective_rank, position_share
from densessl.evaluate.patchseg import PatchSegConfig, PatchSegData, open_split
from densessl.methods.base import build_dataclass
from densessl.models.backbones import as_token_backbone, backbone_info


def backbone_feature_stats(backbone: torch.nn.Module, data_root_path: Path, cfg: PatchSegConfig,
                           num_images: int) -> dict[str, Any]:
    backbone = as_token_backbone(backbone).eval()
    info = backbone_info(backbone)
    reader, num_classes = open_split(cfg, data_root_path, "val")
    data = PatchSegData(reader, num_classes, info.img_size, info.patch_size, info.mean, info.std, "majority")
    count = min(num_images, len(data))
    if count < 2:
        raise ConfigError(f"feature-stats: {len(data)} validation images under {data_root_path}; need at least 2")
    images = torch.stack([data[i][0] for i in range(count)])
    with torch.no_grad():
        tokens = backbone.forward_features(images)[:, info.num_prefix_tokens:]
    return {"images": count, "effective_rank": effective_rank(tokens),
            "colour_explained_share": colour_explained_share(tokens, images, info.patch_size),
            "position_share": position_share(tokens)}


def run_feature_stats(cfg: Config, num_images: int, protocol: str = "patchseg_coco") -> list[dict[str, Any]]:
    if protocol not in ("patchseg_coco", "patchseg_ade20k"):
        raise ConfigError(f"feature-stats: --protocol {protocol!r}; choose patchseg_coco or patchseg_ade20k")
    settings = dict(cfg.eval_settings(protocol), dataset=EVALUATIONS[protocol]["dataset"])
    pcfg = build_dataclass(PatchSegConfig, settings, "evaluate.patchseg")
    manifest = cfg.data_manifest(EVALUATIONS[protocol]["dataset"])
    if not manifest.is_file():
        raise ConfigError(f"feature-stats: {manifest} missing; run the data stage (or `make smoke`) first")
    root = data_root(manifest)
    rows = []
    for run in cfg.all_runs:
        path = cfg.backbone(run)
        if not path.is_file():
            continue
        backbone, _ = load_backbone(path)
        rows.append({"run": run.id, **backbone_feature_stats(backbone, root, pcfg, num_images)})
    if not rows:
        raise ConfigError("feature-stats: no exported backbone yet; run the convert stages (or `make smoke`)")
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'run':44s} {'eff. rank':>9s} {'colour share':>12s} {'position share':>14s}"]
    lines += [f"{r['run']:44s} {r['effective_rank']:9.1f} {r['colour_explained_share']:12.3f} "
              f"{r['position_share']:14.3f}" for r in rows]
    return "\n".join(lines)


def dump(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)
