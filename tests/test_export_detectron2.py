"""detectron2 export: the key names are exactly those of detectron2's ResNet-50 (BN/SyncBN norm), values are
the backbone's, and the CLI writes the pickle the official converters write."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from densessl.checkpoints.detectron2 import detectron2_checkpoint, detectron2_name
from densessl.errors import CheckpointError
from densessl.models.backbones import create_backbone

NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # nn.BatchNorm2d / SyncBatchNorm


def detectron2_resnet_keys(blocks: tuple[int, ...] = (3, 4, 6, 3), convs: int = 3) -> set[str]:
    """Names of detectron2's ResNet (facebookresearch/detectron2, detectron2/modeling/backbone/resnet.py):
    ``BasicStem.conv1`` = ``Conv2d(..., norm=get_norm(norm, 64))`` (bias False); stages ``res2..res5`` are
    ``nn.Sequential`` of blocks; ``BottleneckBlock`` has ``conv1..conv3`` and, when the channel count changes
    (the first block of each stage), ``shortcut``, each a normed Conv2d without bias (``BasicBlock``: ``conv1``,
    ``conv2``, ``shortcut``). A Conv2d's norm is its ``.norm`` child."""
    def conv(prefix: str) -> set[str]:
        return {f"{prefix}.weight"} | {f"{prefix}.norm.{n}" for n in NORM}

    keys = conv("stem.conv1")
    for stage, n in enumerate(blocks, start=2):
        for b in range(n):
            for c in range(1, convs + 1):
                keys |= conv(f"res{stage}.{b}.conv{c}")
            if b == 0:
                keys |= conv(f"res{stage}.{b}.shortcut")
    return keys


def test_resnet50_export_has_exactly_detectron2_names() -> None:
    model = create_backbone("resnet50")
    model.fc = None  # exported backbones carry no classifier (checkpoints.io.save_backbone)
    obj = detectron2_checkpoint(model)
    assert set(obj) == {"model", "__author__", "matching_heuristics"} and obj["matching_heuristics"] is True
    assert set(obj["model"]) == detectron2_resnet_keys()
    state = model.state_dict()
    for key, value in state.items():
        assert np.array_equal(obj["model"][detectron2_name(key)], value.numpy())


def test_official_renaming_examples_and_tiny_basic_blocks() -> None:
    # the examples of the CLoVE/PixPro converter's renaming
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.weight") == "stem.conv1.norm.weight"
    assert detectron2_name("layer1.0.bn2.running_var") == "res2.0.conv2.norm.running_var"
    assert detectron2_name("layer3.0.downsample.1.bias") == "res4.0.shortcut.norm.bias"
    tiny = create_backbone("resnet-tiny")
    keys = set(detectron2_checkpoint(tiny)["model"])
    # resnet-tiny's layer1 keeps its width (16 -> 16): no shortcut there, as detectron2's BasicBlock
    assert keys == detectron2_resnet_keys((1, 1, 1, 1), convs=2) - {
        f"res2.0.shortcut.{s}" for s in ("weight", *(f"norm.{n}" for n in NORM))}
    with pytest.raises(CheckpointError, match="takes a ResNet"):
        detectron2_checkpoint(create_backbone("vit-tiny-p8"))


def test_export_cli_writes_the_pickle(tmp_path: Path) -> None:
    from densessl.checkpoints.export import run_export
    from densessl.config import load_config
    from densessl.stages.convert import run_convert

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"results_dir": str(tmp_path / "results"),
                                "runs": [{"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}],
                                "random_init_seeds": [0]}))
    cfg = load_config([path], root=REPO)
    run_id = "random-init/resnet-tiny.clove-seed0"
    with pytest.raises(CheckpointError, match="no exported backbone"):
        run_export(cfg, "detectron2", run_id, tmp_path / "out.pkl")
    run_convert(cfg, run_id)
    out = run_export(cfg, "detectron2", run_id, tmp_path / "out.pkl")
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "densessl" and "res5.0.conv2.norm.running_mean" in obj["model"]
    with pytest.raises(CheckpointError, match="unknown"):
        run_export(cfg, "caffe", run_id, tmp_path / "x.pkl")
