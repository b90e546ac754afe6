"""Supervised reference: the compared network trained with labels (cross-entropy on image or patch classes).

Not a method of the papers: a diagnostic row. A backbone trained with labels has features an evaluation must be
able to tell from random ones, so "the supervised reference beats the best random-init seed of its network"
checks each evaluation protocol, independently of whether a self-supervised method learned anything in its
budget. It runs through the same pretrain stage, trainer, checkpoints, resume and export as every method.

The recipe is the plain one of supervised ImageNet training (He et al. 2016 §3.4; DeiT, Touvron et al. 2021,
for the ViT's AdamW + cosine + label smoothing): a random-resized crop, a horizontal flip, a linear classifier
on the pooled features (the ViT's class token after its final norm, the ResNet's global average pool) and
cross-entropy. No mixup, cutmix or RandAugment: they pay off over hundreds of epochs, not a smoke minute.

Two targets (``target``). ``image``: one class per image (ImageNet's folders), a linear classifier on the
pooled feature. ``patch``: one class per patch, from the COCO-Stuff semantic maps of the COCO train split
(things and stuff; the maps the Patch-Seg reader uses), each view's map cropped and flipped with its image
(methods/supervised_views.py), a linear head on every patch token (a ResNet's every output cell; Segmenter's
linear decoder, Strudel et al. 2021 §3.2) and cross-entropy on each patch's majority class (Patch-Seg's
``MajorityLoss``). Image-level labels teach features that tell images apart, not patches: label propagation (DAVIS)
scores a ViT trained that way below a random one at smoke scale, so a dense evaluation's reference needs a
dense target.

The network is drawn exactly as the random-init rows it is compared with: ``variant`` names the architecture
variant (models/variants.py; e.g. "clove" = CLoVE's zero-init residual ResNet), so the margin measures the
training and nothing else. The exported backbone drops the classifier.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densessl.errors import ConfigError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.methods.supervised_config import SupervisedConfig
from densessl.methods.supervised_views import IGNORE_INDEX, LabelledViews, PatchLabelledViews
from densessl.models.backbones import create_backbone
from densessl.models.resnet import RESNET_ARCHS, feature_grid, is_resnet, resnet_info
from densessl.models.variants import variant_init_kwargs, variant_kwargs

TARGETS = ("image", "patch")


class SupervisedNetwork(nn.Module):
    """Backbone → pooled feature → linear classifier (image target: (B, K) logits), or backbone → every patch
    token → the same linear layer (patch target: (B, N, K) logits, patches in row-major order)."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "token", target: str = "image"):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.target = target
        self.is_resnet = is_resnet(backbone)
        dim = resnet_info(backbone).feature_dim if self.is_resnet else backbone.embed_dim
        self.classifier = nn.Linear(dim, num_classes)

    @property
    def patch_size(self) -> int:
        """Pixels per patch side: the ViT's patch embedding, the ResNet's output stride."""
        if self.is_resnet:
            return resnet_info(self.backbone).output_stride
        return int(self.backbone.patch_embed.patch_size[0])

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the ViT's patch tokens after the final norm, or the ResNet's last feature map's cells."""
        if self.is_resnet:
            return feature_grid(self.backbone, images).flatten(2).transpose(1, 2)
        return self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.target == "patch":
            return self.classifier(self.patch_tokens(images))
        if self.is_resnet:
            pooled = feature_grid(self.backbone, images).mean(dim=(2, 3))
        elif self.pool == "avg":
            pooled = self.patch_tokens(images).mean(dim=1)
        else:  # timm ViT with num_classes=0: forward_features → final norm → class token (or mean for no-CLS)
            pooled = self.backbone(images)
        return self.classifier(pooled)


@register
class Supervised(PretrainMethod):
    name = "supervised"
    config_cls = SupervisedConfig

    def __init__(self, arch: str, config: dict[str, Any] | SupervisedConfig | None, epochs: int):
        super().__init__()
        cfg = config if isinstance(config, SupervisedConfig) else build_dataclass(
            SupervisedConfig, config, "method config (supervised)")
        self.cfg = cfg
        self.arch = arch
        if cfg.num_classes < 2:
            raise ConfigError(f"pretrain.supervised.method.num_classes: {cfg.num_classes}; needs at least 2 classes")
        if cfg.pool not in ("token", "avg"):
            raise ConfigError(f"pretrain.supervised.method.pool: {cfg.pool!r}; allowed values: token, avg")
        if cfg.target not in TARGETS:
            raise ConfigError(f"pretrain.supervised.method.target: {cfg.target!r}; allowed values: "
                              f"{', '.join(TARGETS)}")
        self.labels = cfg.target  # what the pretrain stage reads with each image
        self.arch_kwargs = variant_kwargs(cfg.variant)  # what the exported backbone is rebuilt with
        extra = {} if arch in RESNET_ARCHS else {"drop_path_rate": cfg.drop_path_rate}
        backbone = create_backbone(arch, **self.arch_kwargs, **variant_init_kwargs(cfg.variant), **extra)
        self.student = SupervisedNetwork(backbone, cfg.num_classes, cfg.pool, cfg.target)
        self.teacher = None
        if cfg.target == "patch" and cfg.crop_size % self.student.patch_size:
            raise ConfigError(f"pretrain.supervised.method.crop_size: {cfg.crop_size} is not a multiple of "
                              f"{arch}'s patch size {self.student.patch_size}; every patch needs its label")

    def check_classes(self, num_classes: int, where: str) -> None:
        """A dataset with more classes than the classifier has outputs cannot be trained on: say which."""
        if num_classes > self.cfg.num_classes:
            raise ConfigError(f"{where}: {num_classes} classes, but pretrain.supervised.method.num_classes is "
                              f"{self.cfg.num_classes}; set num_classes to {num_classes}")

    def views(self) -> LabelledViews | PatchLabelledViews:
        cfg = self.cfg
        if cfg.target == "patch":
            return PatchLabelledViews(cfg.crop_size, cfg.crop_scale, cfg.flip_prob, self.student.patch_size,
                                      cfg.num_classes)
        return LabelledViews(cfg.crop_size, cfg.crop_scale, cfg.flip_prob)

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.cfg.target == "patch":
            return self._patch_loss(batch)
        logits = self.student(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return loss, {"train_top1": accuracy}  # a 0-dim tensor: read back at log steps only

    def _patch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Per-patch cross-entropy over the labelled patches (unlabelled-majority patches ignored)."""
        logits = self.student(batch["image"])
        targets = batch["labels"].flatten(1)
        if logits.shape[1] != targets.shape[1]:
            raise ConfigError(f"supervised patch target: the backbone gives {logits.shape[1]} patch tokens but the "
                              f"label map {targets.shape[1]} patches; crop_size must be the backbone's input size")
        flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX,
                               label_smoothing=self.cfg.label_smoothing)
        labelled = flat_targets != IGNORE_INDEX
        correct = (flat_logits.argmax(dim=1) == flat_targets) & labelled
        accuracy = correct.sum() / labelled.sum().clamp(min=1)
        return loss, {"train_patch_top1": accuracy, "labelled_patches": labelled.float().mean()}

    def export_backbone(self) -> nn.Module:
        return copy.deepcopy(self.student.backbone)
