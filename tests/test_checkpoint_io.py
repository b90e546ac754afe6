from __future__ import annotations

import json

import pytest
import torch

from densessl.checkpoints.io import load_backbone, save_backbone, sidecar_path
from densessl.errors import CheckpointError
from densessl.models.backbones import create_backbone, patch_tokens


def test_roundtrip_gives_identical_features(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit-tiny-p8").eval()
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, model, "vit-tiny-p8", {}, {"run": "x"})
    loaded, meta = load_backbone(path)
    loaded.eval()
    assert meta["run"] == "x" and meta["arch"] == "vit-tiny-p8"
    x = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(patch_tokens(model, x), patch_tokens(loaded, x), rtol=0, atol=0)
    assert patch_tokens(model, x).shape == (2, 128, 8, 6)


def test_wrong_architecture_is_rejected(tmp_path):
    path = tmp_path / "b.safetensors"
    save_backbone(path, create_backbone("vit-tiny-p8"), "vit-tiny-p8", {}, {})
    meta = json.loads(sidecar_path(path).read_text())
    meta["arch"] = "vit-s16"
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match architecture 'vit-s16'"):
        load_backbone(path)


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="run the pretrain/export stage"):
        load_backbone(tmp_path / "none.safetensors")
