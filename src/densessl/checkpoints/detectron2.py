"""Export an exported ResNet backbone as a detectron2 weights file (``.pkl``), for users who run detectron2.

detectron2 is not on PyPI and densessl does not depend on it; its transfer protocols (MoCo, PixPro, CLoVE) load
backbones through ``MODEL.WEIGHTS out.pkl`` written by the official converters
(facebookresearch/moco ``detection/convert-pretrain-to-detectron2.py``, zdaxie/PixPro @ e390d6b
``transfer/detection/convert_pretrain_to_d2.py``, copied unchanged by sthalles/CLoVE). This module applies the
same renaming to the torchvision-named state of a densessl backbone, in the converters' order:

1. keys without ``layer`` get ``stem.`` prepended (``conv1`` -> ``stem.conv1``, ``bn1`` -> ``stem.bn1``);
2. ``layer{1..4}`` -> ``res{2..5}``;
3. ``bn{1,2,3}`` -> ``conv{1,2,3}.norm``;
4. ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``;

values become numpy arrays and the pickle is ``{"model": ..., "__author__": ..., "matching_heuristics": True}``,
so detectron2's ``DetectionCheckpointer`` matches the names by suffix (``res2.*`` ->
``backbone.bottom_up.res2.*`` in an FPN model). ``num_batches_tracked`` is carried, as the official
converters do (detectron2's BN/SyncBN layers have it). The classifier ``fc`` is not exported
(``checkpoints.io.save_backbone`` drops it). Use the converters' detectron2 settings with these weights:
``MODEL.RESNETS.STRIDE_IN_1X1 False``, ``INPUT.FORMAT RGB``, ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``,
``MODEL.PIXEL_STD [58.395, 57.12, 57.375]`` (PixPro ``configs/*_PixPro.yaml``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densessl.errors import CheckpointError
from densessl.io import atomic_path
from densessl.models.resnet import is_resnet

AUTHOR = "densessl"


def detectron2_name(key: str) -> str:
    """The detectron2 name of one torchvision ResNet key (the official converters' replacements, in order)."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Renamed numpy copy of a torchvision ResNet state dict (``fc.*`` left out)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        name = detectron2_name(key)
        if name in out:
            raise CheckpointError(f"detectron2 export: two keys map to {name!r}; is this a torchvision ResNet?")
        out[name] = value.detach().cpu().numpy()
    return out


def detectron2_checkpoint(model: torch.nn.Module, author: str = AUTHOR) -> dict[str, Any]:
    """The object the official converters pickle."""
    if not is_resnet(model):
        raise CheckpointError(f"detectron2 export takes a ResNet backbone (torchvision names); got "
                              f"{type(model).__name__}. ViT backbones go to mmdet/mmseg instead")
    return {"model": to_detectron2(model.state_dict()), "__author__": author, "matching_heuristics": True}


def write_detectron2(model: torch.nn.Module, out: str | Path, author: str = AUTHOR) -> Path:
    """Pickle :func:`detectron2_checkpoint` to ``out`` atomically."""
    out = Path(out)
    obj = detectron2_checkpoint(model, author)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f)
    return out
