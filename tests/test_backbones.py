"""backbone_info: the input normalisation each backbone is evaluated with.

Timm models by name carry their own mean/std in ``pretrained_cfg`` (Patch-Seg normalises with it,
iancovert/patch-seg ``patchseg/vision_backbones.py``); our exported backbones keep the ImageNet statistics their
pretraining views used. Timm models are built with ``pretrained=False`` (no network) and one block (fast):
``pretrained_cfg`` comes from the tag, not from the weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from densessl.checkpoints.io import load_backbone, save_backbone
from densessl.errors import ConfigError
from densessl.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneInfo,
    as_token_backbone,
    backbone_info,
    create_backbone,
)
from densessl.models.variants import variant_init_kwargs, variant_kwargs


@pytest.mark.parametrize(("name", "mean", "std"), [
    ("vit_base_patch16_clip_224.openai", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ("vit_base_patch16_siglip_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("vit_small_patch14_reg4_dinov2.lvd142m", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
])
def test_timm_model_by_name_is_normalised_with_its_own_mean_std(name: str, mean: tuple, std: tuple) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=0, depth=1)
    info = backbone_info(as_token_backbone(model))
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)
    assert all(isinstance(v, float) for v in (*info.mean, *info.std))


def test_timm_img_size_sets_the_grid_the_benchmark_uses() -> None:
    """iancovert/patch-seg backbone registry: the custom DINOv2 entries are built at 224 (16x16 patches), not
    timm's native 518."""
    model = timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, num_classes=0, depth=1,
                              img_size=224)
    info = backbone_info(model)
    assert (info.img_size, info.patch_size, info.num_prefix_tokens) == (224, 14, 5)


def test_non_rgb_pretrained_cfg_is_a_clear_error() -> None:
    model = create_backbone("vit-tiny-p8")
    model.pretrained_cfg = {"mean": (0.5,), "std": (0.5,), "architecture": "gray_vit"}
    with pytest.raises(ConfigError, match="gray_vit.*3 values"):
        backbone_info(model)


# The numbers our own backbones were evaluated with before timm normalisation was read (ImageNet mean/std).
OWN_VIT = BackboneInfo(patch_size=8, embed_dim=128, num_heads=4, num_prefix_tokens=1, img_size=64,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.mark.parametrize(("arch", "variant", "expected"), [
    ("vit-tiny-p8", None, OWN_VIT),  # DINO (and GTSA) export the standard ViT
    ("vit-tiny-p8", "loca", BackboneInfo(**{**OWN_VIT.__dict__, "num_prefix_tokens": 0})),  # no class token
    ("vit-tiny-p8", "selfpatch", BackboneInfo(**{**OWN_VIT.__dict__, "num_prefix_tokens": 0})),
    ("resnet-tiny", "clove", BackboneInfo(patch_size=8, embed_dim=128, num_heads=2, num_prefix_tokens=0,
                                          img_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))),
])
def test_exported_backbones_keep_their_imagenet_normalisation(tmp_path: Path, arch: str, variant: str | None,
                                                              expected: BackboneInfo) -> None:
    """Exported backbones have no timm pretrained_cfg: their info (ImageNet mean/std included) is unchanged."""
    torch.manual_seed(0)
    model = create_backbone(arch, **variant_kwargs(variant), **variant_init_kwargs(variant))
    save_backbone(tmp_path / "b.safetensors", model, arch, variant_kwargs(variant), {})
    loaded, _ = load_backbone(tmp_path / "b.safetensors")
    assert not hasattr(loaded, "pretrained_cfg")
    info = backbone_info(as_token_backbone(loaded))
    assert info == expected
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("arch, dim, depth, heads", [("vit-l16", 1024, 24, 16), ("vit-h16", 1280, 32, 16)])
def test_large_vits_have_the_published_shapes(arch, dim, depth, heads):
    """ViT-L/16 and ViT-H/16 (LOCA's ImageNet-21k rows) built on the meta device: no memory, exact shapes.
    Parameters by hand: 12·D² + 13·D per block, 16·16·3·D + D patch embedding, 197·D position embedding
    (196 patches + class token), D class token, 2·D final norm."""
    with torch.device("meta"):
        model = create_backbone(arch)
    expected = depth * (12 * dim**2 + 13 * dim) + (768 * dim + dim) + 197 * dim + dim + 2 * dim
    assert sum(p.numel() for p in model.parameters()) == expected
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)
    with torch.device("meta"):
        loca = create_backbone(arch, **variant_kwargs("loca"))  # no class token, tanh GELU
    assert loca.num_prefix_tokens == 0 and loca.pos_embed.shape[1] == 196
    assert loca.blocks[0].mlp.act.approximate == "tanh"
