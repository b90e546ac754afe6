"""ResNets are evaluated on their last feature map as a patch grid (CLoVE): the token view must be
exactly C5, and survive export/reload with torchvision's parameter names."""

from __future__ import annotations

import torch

from densessl.checkpoints.io import load_backbone, save_backbone
from densessl.models.backbones import (
    ResNetTokens,
    as_token_backbone,
    backbone_info,
    create_backbone,
    patch_tokens,
)
from densessl.models.resnet import feature_grid


def test_resnet_token_view_is_its_last_feature_map(tmp_path):
    torch.manual_seed(0)
    resnet = create_backbone("resnet-tiny").eval()
    save_backbone(tmp_path / "r.safetensors", resnet, "resnet-tiny", {}, {})
    loaded, meta = load_backbone(tmp_path / "r.safetensors")
    assert meta["arch"] == "resnet-tiny" and "layer4.0.conv1.weight" in loaded.state_dict()
    view = as_token_backbone(loaded.eval())
    assert isinstance(view, ResNetTokens)
    info = backbone_info(view)
    assert (info.patch_size, info.embed_dim, info.num_prefix_tokens) == (8, 128, 0)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        grid = patch_tokens(view, x)
        assert grid.shape == (2, 128, 8, 6)
        assert torch.equal(grid, feature_grid(resnet, x))
        tokens = view.forward_features(x)
    assert torch.equal(tokens[:, 6 * 3 + 2], grid[:, :, 3, 2])  # row-major cells, as ViT patch tokens


def test_vits_are_left_alone():
    vit = create_backbone("vit-tiny-p8")
    assert as_token_backbone(vit) is vit


def test_clove_export_and_release_import_store_the_same_keys(tmp_path):
    """Our CLoVE export keeps an unused `fc`; the official-release importer builds ResNet-50 without one.
    Both must write (and reload) the same backbone keys."""
    import torchvision
    from torch import nn

    trained = create_backbone("resnet-tiny")
    save_backbone(tmp_path / "a.safetensors", trained, "resnet-tiny", {}, {})
    loaded, _ = load_backbone(tmp_path / "a.safetensors")
    assert not any(k.startswith("fc.") for k in loaded.state_dict())
    imported = torchvision.models.resnet50(weights=None)
    imported.fc = nn.Identity()
    save_backbone(tmp_path / "b.safetensors", imported, "resnet50", {}, {})
    reloaded, _ = load_backbone(tmp_path / "b.safetensors")
    assert set(reloaded.state_dict()) == set(imported.state_dict())
