"""Export a densessl backbone into mmdet's key layout, as safetensors.

Key layouts (what the generated detectors hold; ``tests/test_mmdet_export.py`` loads each export into the
toolkit's model and finds zero missing and zero unexpected backbone keys):

- ResNet + FPN: ``backbone.<torchvision name>`` (mmdet's ``ResNet`` with ``style='pytorch'`` has torchvision's
  names: ``conv1``, ``bn1``, ``layer{1..4}.<i>.{conv,bn}<j>``, ``downsample.{0,1}``; mmengine's ``Pretrained`` init strips ``module.``);
- ResNet C4: stem and ``layer1..3`` as above, ``layer4.*`` as ``roi_head.shared_head.layer4.*`` (res5 is the
  RoI head). Loading res5 explicitly matters: mmdet's own Mask R-CNN C4 base leaves it randomly initialised
  (no ``init_cfg`` on the shared head, open-mmlab/mmdetection#3289);
- ViT: ``backbone.vit.<timm name>`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.*``) without
  the final ``norm`` (the adaptor reads block outputs, as the official SelfPatch/GTSA detection backbones).
  The adaptor (``backbone.fpn{1..4}``) is new in the detector and starts from its own init.

The file is safetensors (no pickle), loaded by the toolkit's ``init_cfg=dict(type='Pretrained', ...)`` through
mmengine_run's ``safetensors://`` scheme.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from densessl.errors import CheckpointError
from densessl.io import atomic_path

_VIT_DROP = ("norm.", "fc_norm.", "head.")


def mmdet_state_dict(state: dict[str, torch.Tensor], family: str, detector: str) -> dict[str, torch.Tensor]:
    """Our backbone's ``state_dict`` (torchvision / timm names) → the detector's key names."""
    if family == "vit":
        return {f"backbone.vit.{k}": v for k, v in state.items() if not k.startswith(_VIT_DROP)}
    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        if detector == "c4" and k.startswith("layer4."):
            out[f"roi_head.shared_head.{k}"] = v
        else:
            out[f"backbone.{k}"] = v
    return out


def init_prefixes(family: str, detector: str) -> dict[str, str]:
    """Detector module path → key prefix in the export, for the ``Pretrained`` init of each part."""
    if family == "resnet" and detector == "c4":
        return {"backbone": "backbone.", "roi_head.shared_head": "roi_head.shared_head."}
    return {"backbone": "backbone."}


def export_mmdet(backbone_path: Path, out: Path, family: str, detector: str) -> Path:
    """Write ``out`` (safetensors) from an exported densessl backbone (``checkpoints/io.py`` format)."""
    backbone_path = Path(backbone_path)
    if not backbone_path.is_file():
        raise CheckpointError(f"{backbone_path}: backbone checkpoint not found; run the convert stage first")
    state = mmdet_state_dict(load_file(str(backbone_path)), family, detector)
    if not state:
        raise CheckpointError(f"{backbone_path}: no backbone weights to export for the {detector} detector")
    header = {"densessl": json.dumps({"format": "densessl-mmdet/1", "family": family, "detector": detector,
                                      "source": str(backbone_path)}, sort_keys=True)}
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=header)
    return out
