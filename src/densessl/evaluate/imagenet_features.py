"""Image-level features and preprocessing of DINO's ImageNet evaluations (``eval_knn.py``, ``eval_linear.py``).

Official repository facebookresearch/dino @ 7c446df:

* evaluation transform (both scripts): ``Resize(256, interpolation=3)`` (bicubic, shorter side) →
  ``CenterCrop(224)`` → ``ToTensor`` → ``Normalize`` with the ImageNet mean/std;
* linear training transform (``eval_linear.py``): ``RandomResizedCrop(224)`` (torchvision defaults: scale
  (0.08, 1), bilinear) → ``RandomHorizontalFlip`` → ``ToTensor`` → ``Normalize``;
* k-NN feature (``eval_knn.py``): ``model(x)``, i.e. a ViT's final-norm CLS token; a torchvision ResNet with
  ``fc = Identity``, i.e. the global-average-pooled last feature map;
* linear feature (``eval_linear.py``): the CLS tokens of the last ``n_last_blocks`` blocks, each through the
  final norm (``get_intermediate_layers``), concatenated; with ``avgpool_patchtokens`` the mean patch token of
  the last block is interleaved with them (``cat((cls.unsqueeze(-1), avg.unsqueeze(-1)), -1).reshape``,
  defined only for ``n_last_blocks = 1``). ResNets: the global-average-pooled feature, as ``model(inp)``.

Sizes scale with the backbone: ``crop_size`` defaults to the backbone's native input (224 for the paper
ViTs) and ``resize_size`` to ``round(crop_size * 256 / 224)``, the official ratio.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from densessl.data.imagenet import LabelledImageFolder
from densessl.errors import ConfigError
from densessl.models.backbones import ResNetTokens


def eval_sizes(crop_size: int | None, resize_size: int | None, native: int) -> tuple[int, int]:
    """(resize, crop): the official 256 / 224 pair, scaled to the backbone's native size when not given."""
    crop = int(crop_size or native)
    resize = int(resize_size or round(crop * 256 / 224))
    if crop < 1 or resize < crop:
        raise ConfigError(f"imagenet evaluation: resize_size {resize} must be >= crop_size {crop} >= 1")
    return resize, crop


def eval_transform(resize: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Image.Image], torch.Tensor]:
    """``eval_knn.py`` / ``eval_linear.py`` validation transform (bicubic shorter-side resize, centre crop)."""
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(mean, std)])


def train_transform(crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Image.Image], torch.Tensor]:
    """``eval_linear.py`` training transform (torchvision ``RandomResizedCrop`` defaults, flip)."""
    return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def is_resnet(backbone: nn.Module) -> bool:
    return isinstance(backbone, ResNetTokens)


def global_feature(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The k-NN feature: a ViT's final-norm CLS token, a ResNet's global-average-pooled last map -> (B, D)."""
    tokens = backbone.forward_features(images)
    if is_resnet(backbone):
        return tokens.mean(dim=1)  # ResNetTokens: the cells of the last map; their mean = avgpool + flatten
    if int(getattr(backbone, "num_prefix_tokens", 0)) < 1:
        # SelfPatch's and LOCA's ViTs have no CLS token: their image feature is the mean patch token, as LOCA's
        # own ViT pools (scenic, classifier "gap"); a deliberate difference from DINO's CLS readout
        return tokens.mean(dim=1)
    return tokens[:, 0]


def last_blocks(backbone: nn.Module, images: torch.Tensor, n: int) -> list[torch.Tensor]:
    """DINO ``get_intermediate_layers(x, n)``: the outputs of the last ``n`` blocks, each through the final
    norm, prefix tokens kept -> n tensors (B, 1 + N, D), oldest first."""
    blocks = backbone.blocks
    if not 1 <= n <= len(blocks):
        raise ConfigError(f"imagenet linear: n_last_blocks {n} must be in [1, {len(blocks)}] for this backbone")
    x = backbone.patch_embed(images)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    out = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i >= len(blocks) - n:
            out.append(backbone.norm(x))
    return out


def linear_feature(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int,
                   avgpool_patchtokens: bool) -> torch.Tensor:
    """The input of ``eval_linear.py``'s ``LinearClassifier`` -> (B, D * (n_last_blocks + avgpool))."""
    if is_resnet(backbone):
        return global_feature(backbone, images)
    inter = last_blocks(backbone, images, n_last_blocks)
    # the CLS token of each block; a ViT without one (SelfPatch, LOCA) gives its mean patch token instead
    cls = int(getattr(backbone, "num_prefix_tokens", 0)) >= 1
    output = torch.cat([x[:, 0] if cls else x.mean(dim=1) for x in inter], dim=-1)
    if avgpool_patchtokens:
        if n_last_blocks != 1:  # the official cat of (B, nD, 1) with (B, D, 1) fails for n > 1
            raise ConfigError("imagenet linear: avgpool_patchtokens needs n_last_blocks 1 (the official code "
                              "interleaves one CLS token with the patch mean; ViT-B: n_last_blocks 1, avgpool true)")
        prefix = int(backbone.num_prefix_tokens)
        avg = inter[-1][:, prefix:].mean(dim=1)
        output = torch.cat((output.unsqueeze(-1), avg.unsqueeze(-1)), dim=-1).reshape(output.shape[0], -1)
    return output


def feature_dim(backbone: nn.Module, embed_dim: int, n_last_blocks: int, avgpool_patchtokens: bool) -> int:
    """``embed_dim * (n_last_blocks + int(avgpool_patchtokens))`` for ViTs, the pooled width for ResNets."""
    return embed_dim if is_resnet(backbone) else embed_dim * (n_last_blocks + int(avgpool_patchtokens))


class TransformedPairs(Dataset):
    """(transformed image, class index) pairs of a labelled ImageFolder split, in its order."""

    def __init__(self, folder: LabelledImageFolder, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.folder[index]), self.folder.labels[index]
