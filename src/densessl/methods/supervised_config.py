"""The supervised reference's settings (``pretrain.supervised.method``); each field cites its official source.

The method (:mod:`densessl.methods.supervised`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SupervisedConfig:
    # "image": class per image (data: imagenet); "patch": class per patch from the semantic maps (data: coco)
    target: str = "image"
    num_classes: int = 1000               # ImageNet-1k (the synthetic one has 8); patch target: COCO-Stuff's 183
    variant: str | None = None            # architecture variant (models/variants.py); set from the run
    crop_size: int = 224                  # RandomResizedCrop(224), the standard ImageNet training crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision RandomResizedCrop default (Inception crop)
    flip_prob: float = 0.5
    label_smoothing: float = 0.1          # DeiT's 0.1
    drop_path_rate: float = 0.0           # ViT only
    # ViT only: what the classifier reads. "token": the class token after the final norm (DeiT); "avg": the mean
    # of the normalised patch tokens, which puts the label's gradient on every patch token directly.
    # Not read by the patch target, whose head reads every patch token.
    pool: str = "token"
