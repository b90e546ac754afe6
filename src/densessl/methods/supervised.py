"""Supervised reference: the compared network trained with labels (cross-entropy on the image classes).

Not a method of the papers: a diagnostic row. A backbone trained with labels has features an evaluation must be
able to tell from random ones, so "the supervised reference beats the best random-init seed of its network"
checks each evaluation protocol, independently of whether a self-supervised method learned anything in its
budget. It runs through the same pretrain stage, trainer, checkpoints, resume and export as every method.

The recipe is the plain one of supervised ImageNet training (He et al. 2016 §3.4; DeiT, Touvron et al. 2021,
for the ViT's AdamW + cosine + label smoothing): a random-resized crop, a horizontal flip, a linear classifier
on the pooled features (the ViT's class token after its final norm, the ResNet's global average pool) and
cross-entropy. No mixup, cutmix or RandAugment: they pay off over hundreds of epochs, not a smoke minute.

The network is drawn exactly as the random-init rows it is compared with: ``variant`` names the architecture
variant (models/variants.py; e.g. "clove" = CLoVE's zero-init residual ResNet), so the margin measures the
training and nothing else. The exported backbone drops the classifier.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn

from densessl.errors import ConfigError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.models.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from densessl.models.resnet import RESNET_ARCHS, feature_grid, is_resnet, resnet_info
from densessl.models.variants import variant_init_kwargs, variant_kwargs


@dataclass
class SupervisedConfig:
    num_classes: int = 1000               # ImageNet-1k; the synthetic ImageNet has 8 (one per thing class)
    variant: str | None = None            # architecture variant (models/variants.py); set from the run
    crop_size: int = 224                  # RandomResizedCrop(224), the standard ImageNet training crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision RandomResizedCrop default (Inception crop)
    flip_prob: float = 0.5
    label_smoothing: float = 0.1          # DeiT's 0.1
    drop_path_rate: float = 0.0           # ViT only
    # ViT only: what the classifier reads. "token": the class token after the final norm (DeiT); "avg": the mean
    # of the normalised patch tokens, which puts the label's gradient on every patch token directly
    pool: str = "token"


class SupervisedNetwork(nn.Module):
    """Backbone → pooled feature → linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "token"):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.is_resnet = is_resnet(backbone)
        dim = resnet_info(backbone).feature_dim if self.is_resnet else backbone.embed_dim
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_resnet:
            pooled = feature_grid(self.backbone, images).mean(dim=(2, 3))
        elif self.pool == "avg":
            pooled = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:].mean(dim=1)
        else:  # timm ViT with num_classes=0: forward_features → final norm → class token (or mean for no-CLS)
            pooled = self.backbone(images)
        return self.classifier(pooled)


class LabelledViews:
    """(PIL image, class index) → {"image": normalised crop, "label": index}."""

    def __init__(self, cfg: SupervisedConfig):
        self.transform = T.Compose([
            T.RandomResizedCrop(cfg.crop_size, scale=cfg.crop_scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(cfg.flip_prob),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __call__(self, item: tuple[Image.Image, int]) -> dict[str, Any]:
        image, label = item
        return {"image": self.transform(image), "label": torch.tensor(label, dtype=torch.long)}


@register
class Supervised(PretrainMethod):
    name = "supervised"
    config_cls = SupervisedConfig
    needs_labels: ClassVar[bool] = True

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
        self.arch_kwargs = variant_kwargs(cfg.variant)  # what the exported backbone is rebuilt with
        extra = {} if arch in RESNET_ARCHS else {"drop_path_rate": cfg.drop_path_rate}
        backbone = create_backbone(arch, **self.arch_kwargs, **variant_init_kwargs(cfg.variant), **extra)
        self.student = SupervisedNetwork(backbone, cfg.num_classes, cfg.pool)
        self.teacher = None

    def check_classes(self, classes: list[str], where: str) -> None:
        """A dataset with more classes than the classifier has outputs cannot be trained on: say which."""
        if len(classes) > self.cfg.num_classes:
            raise ConfigError(f"{where}: {len(classes)} classes, but pretrain.supervised.method.num_classes is "
                              f"{self.cfg.num_classes}; set num_classes to {len(classes)}")

    def views(self) -> LabelledViews:
        return LabelledViews(self.cfg)

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.student(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return loss, {"train_top1": float(accuracy)}

    def export_backbone(self) -> nn.Module:
        return copy.deepcopy(self.student.backbone)
