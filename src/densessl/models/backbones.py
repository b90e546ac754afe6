"""Backbones by name. Every architecture is a timm ``VisionTransformer`` (:class:`ResampledViT`, which
resamples its positional embedding as the method's official code does) built from explicit keyword
arguments (never a hub download), so the same code builds the 2-layer smoke ViT and ViT-H/16.

The architecture name plus its keyword arguments are stored with every exported checkpoint, which is all a
later stage needs to rebuild the module before loading the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from densessl.errors import ConfigError
from densessl.models.arch_names import ARCH_DISPLAY  # noqa: F401  (also importable from here)
from densessl.models.pos_embed import ResampledViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Standard ViT sizes (Dosovitskiy et al.; DINO vision_transformer.py uses the same widths/depths/heads for
# S and B). qkv_bias=True and LayerNorm eps 1e-6 match DINO and timm.
VIT_ARCHS: dict[str, dict[str, Any]] = {
    # ours (smoke scale): D=128, depth 4, 64 px, patch 8 (docs/learning_signal.md)
    "vit-tiny-p8": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "vit-s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit-b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit-l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit-h16": dict(img_size=224, patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    # DINO's released patch-8 models (facebookresearch/dino README: DeiT-S/8, ViT-B/8; vision_transformer.py
    # vit_small / vit_base with patch_size=8)
    "vit-s8": dict(img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit-b8": dict(img_size=224, patch_size=8, embed_dim=768, depth=12, num_heads=12),
}



@dataclass(frozen=True)
class BackboneInfo:
    patch_size: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def vit_kwargs(arch: str, **overrides: Any) -> dict[str, Any]:
    """Full keyword arguments for ``VisionTransformer`` of ``arch``; ``overrides`` win (e.g. drop_path_rate)."""
    if arch not in VIT_ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(VIT_ARCHS)}")
    kwargs: dict[str, Any] = dict(
        VIT_ARCHS[arch],
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        class_token=True,
        global_pool="token",
        dynamic_img_size=True,  # multi-crop feeds 224 and 96 px crops through the same positional embedding
        drop_path_rate=0.0,
        gelu_tanh=False,
        pos_embed_init="timm",  # initial values only: 'timm' N(0, 0.02) | 'flax' N(0, 1/D) (drawn after the rest)
        # how the positional embedding is resampled at other grids (models/pos_embed.py): DINO's
        # interpolate_pos_encoding, which DINO, SelfPatch and GTSA share; LOCA's variant sets 'scenic'
        pos_resample="dino",
    )
    kwargs.update(overrides)
    return kwargs


def create_backbone(arch: str, **overrides: Any) -> nn.Module:
    """Build the backbone ``arch`` with random weights (timm's or torchvision's default init)."""
    from densessl.models.resnet import RESNET_ARCHS, create_resnet

    if arch in RESNET_ARCHS:
        return create_resnet(arch, **overrides)
    kwargs = vit_kwargs(arch, **overrides)
    pos_embed_init = kwargs.pop("pos_embed_init")
    gelu_tanh = kwargs.pop("gelu_tanh")
    if gelu_tanh:  # LOCA's flax ViT uses the tanh approximation of GELU (flax nn.gelu default, scenic vit.py)
        kwargs["act_layer"] = partial(nn.GELU, approximate="tanh")
    if not kwargs["class_token"] and kwargs["global_pool"] == "token":
        kwargs["global_pool"] = "avg"
        # timm would move the final LayerNorm after pooling (fc_norm) for avg pooling; LOCA's flax ViT
        # normalises every token ("encoder_norm" in scenic projects/loca/vit.py): dense evaluation needs it.
        kwargs.setdefault("fc_norm", False)
    kwargs["norm_layer"] = partial(nn.LayerNorm, eps=1e-6)
    model = ResampledViT(**kwargs)
    if pos_embed_init == "flax":  # scenic ToTokenSequence posembed_input: normal(stddev=1/sqrt(D))
        with torch.no_grad():
            nn.init.normal_(model.pos_embed, std=1.0 / model.embed_dim**0.5)
    elif pos_embed_init != "timm":
        raise ConfigError(f"pos_embed_init={pos_embed_init!r}: choose 'timm' (N(0, 0.02)) or 'flax' (N(0, 1/D))")
    return model


class ResNetTokens(nn.Module):
    """A ResNet seen as a patch-token backbone: the cells of its last feature map are the tokens.

    Dense evaluations are written against the ViT interface (``forward_features`` → (B, N, D) tokens,
    ``num_prefix_tokens``); CLoVE is evaluated on C5 as a patch grid, which is exactly this view.
    """

    num_prefix_tokens = 0

    def __init__(self, resnet: nn.Module):
        super().__init__()
        from densessl.models.resnet import resnet_info

        self.resnet = resnet
        self.info = resnet_info(resnet)
        self.embed_dim = self.info.feature_dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        from densessl.models.resnet import feature_grid

        return feature_grid(self.resnet, images).flatten(2).transpose(1, 2)


def as_token_backbone(model: nn.Module) -> nn.Module:
    """ViTs unchanged; a torchvision ResNet wrapped in :class:`ResNetTokens`."""
    from densessl.models.resnet import is_resnet

    return ResNetTokens(model) if is_resnet(model) else model


def timm_normalization(model: nn.Module) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """The (mean, std) a model built by ``timm.create_model`` declares in its ``pretrained_cfg``, else None.

    Why: a published backbone was trained on inputs normalised its own way (OpenAI CLIP, SigLIP's 0.5/0.5,
    ...), and Patch-Seg normalises with the backbone's timm mean/std (iancovert/patch-seg
    ``patchseg/vision_backbones.py``). Our own backbones are built from ``VisionTransformer(**kwargs)`` /
    torchvision and never carry a ``pretrained_cfg``, so they keep the ImageNet statistics their pretraining
    views used.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or cfg.get("mean") is None or cfg.get("std") is None:
        return None
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if len(mean) != 3 or len(std) != 3:
        name = cfg.get("hf_hub_id") or cfg.get("architecture") or type(model).__name__
        raise ConfigError(f"timm model {name!r}: pretrained_cfg mean={mean} std={std}; Patch-Seg and the dense "
                          f"protocols read RGB images and need 3 values each (pick an RGB model)")
    return mean, std  # type: ignore[return-value]


def backbone_info(model: nn.Module) -> BackboneInfo:
    """Geometry and input normalisation of a token backbone.

    mean/std: a timm-by-name model's own (``pretrained_cfg``, see :func:`timm_normalization`); otherwise the
    ImageNet statistics every densessl pretraining normalises with (data/views.py, the LOCA/GTSA views).
    """
    if isinstance(model, ResNetTokens):
        i = model.info
        # num_heads only sizes Patch-Seg's transformer head on top of the grid (64-d heads, as ViT-S/B)
        return BackboneInfo(patch_size=i.output_stride, embed_dim=i.feature_dim, num_heads=max(1, i.feature_dim // 64),
                            num_prefix_tokens=0, img_size=i.img_size, mean=i.mean, std=i.std)
    patch = model.patch_embed.patch_size
    img = model.patch_embed.img_size
    mean, std = timm_normalization(model) or (IMAGENET_MEAN, IMAGENET_STD)
    return BackboneInfo(
        patch_size=int(patch[0] if isinstance(patch, tuple) else patch),
        embed_dim=int(model.embed_dim),
        num_heads=int(model.blocks[0].attn.num_heads),
        num_prefix_tokens=int(model.num_prefix_tokens),
        img_size=int(img[0] if isinstance(img, tuple) else img),
        mean=mean,
        std=std,
    )


def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens as a grid (B, D, H/p, W/p); prefix (class/register) tokens dropped."""
    tokens = model.forward_features(images)
    prefix = model.num_prefix_tokens
    b, _, h, w = images.shape
    p = backbone_info(model).patch_size
    grid = tokens[:, prefix:, :]
    return grid.transpose(1, 2).reshape(b, grid.shape[-1], h // p, w // p)
