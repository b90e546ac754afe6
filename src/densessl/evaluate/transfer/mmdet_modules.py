"""Modules registered into mmdet's ``MODELS`` registry for the densessl detection protocols.

Imported by the generated configs (``custom_imports``); importing it needs mmdet and mmcv.

- ``DenseSSLViTFPN``: a densessl ViT (timm ``VisionTransformer``, built as ``models/backbones.py`` builds it)
  whose block outputs 3, 5, 7, 11 (patch tokens only, no final norm) go through the multi-level adaptor of
  SelfPatch/GTSA: fpn1 = ConvT2x2 -> norm -> GELU -> ConvT2x2 (stride 4), fpn2 = ConvT2x2 (8), fpn3 = identity
  (16), fpn4 = MaxPool 2 (32) for patch 16 (official repos alinlab/SelfPatch ``detection/backbone/vit_SelfPatch.py``
  and bok3948/GTSA ``downstream/mmdet/my_models/vit_timm.py``). Other patch sizes reach the same strides
  4..32 with as many 2x up-convolutions (or poolings) as needed; patch 16 gives exactly the official modules.
- ``DenseSSLResNet``: mmdet's ``ResNet`` with a configurable stem and stage depths, for the smoke ``resnet-tiny``
  (mmdet's ``ResNet`` only knows depths 18..152 and a 7x7/2 stem + max-pool); key names stay torchvision's.
- ``DenseSSLRes5Head``: the C4 RoI head's res5 (``layer4``) built from the backbone's widths, with the extra norm
  layer after res5 of MoCo's ``Res5ROIHeadsExtraNorm`` (PixPro/CLoVE ``transfer/detection/train_net.py``);
  mmdet's ``ResLayer`` shared head hard-codes ResNet-50 widths and has no such norm.
"""

from __future__ import annotations

from typing import Any

import torch
from mmcv.cnn import build_norm_layer
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
from mmdet.models.layers import ResLayer
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn

from densessl.evaluate.transfer.mmdet_backbone import adaptor_factors
from densessl.models.backbones import create_backbone

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _adaptor_level(factor: float, dim: int, norm_cfg: dict[str, Any]) -> nn.Module:
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        k = int(round(1 / factor))
        return nn.MaxPool2d(kernel_size=k, stride=k)
    layers: list[nn.Module] = []
    for i in range(int(round(torch.log2(torch.tensor(factor)).item()))):
        if i:
            layers += [build_norm_layer(norm_cfg, dim)[1], nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


@MODELS.register_module()
class DenseSSLViTFPN(BaseModule):
    """ViT + multi-level adaptor: four feature maps at strides 4, 8, 16, 32 for an FPN neck."""

    def __init__(self, arch: str, arch_kwargs: dict[str, Any], num_heads: int, out_indices: list[int],
                 drop_path_rate: float = 0.0, norm_cfg: dict[str, Any] | None = None,
                 init_cfg: dict[str, Any] | None = None) -> None:
        super().__init__(init_cfg)
        kwargs = {**arch_kwargs, "num_heads": num_heads, "drop_path_rate": drop_path_rate}
        self.vit = create_backbone(arch, **kwargs)
        self.vit.norm = nn.Identity()  # the adaptor reads block outputs before any final norm (official)
        self.out_indices = list(out_indices)
        patch = self.vit.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple) else patch)
        dim = int(self.vit.embed_dim)
        norm_cfg = norm_cfg or {"type": "BN", "requires_grad": True}
        for level, factor in enumerate(adaptor_factors(self.patch_size), start=1):
            self.add_module(f"fpn{level}", _adaptor_level(factor, dim, norm_cfg))

    def init_weights(self) -> None:
        super().init_weights()  # timm's own init for the ViT, PyTorch defaults for the adaptor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.vit.forward_intermediates(x, indices=self.out_indices, norm=False, output_fmt="NCHW",
                                               intermediates_only=True)
        return tuple(getattr(self, f"fpn{i + 1}")(f) for i, f in enumerate(feats))


@MODELS.register_module()
class DenseSSLResNet(ResNet):
    """mmdet ``ResNet`` with explicit block type, stage depths and stem (``models/resnet.py`` TinyResNetSpec)."""

    def __init__(self, block: str, stage_blocks: tuple[int, ...], stem_kernel: int = 7, stem_stride: int = 2,
                 maxpool: bool = True, **kwargs: Any) -> None:
        # mmdet's ResNet reads its arch table and builds its stem inside __init__: set both first
        self.arch_settings = {"densessl": (_BLOCKS[block], tuple(stage_blocks))}
        self._stem = (int(stem_kernel), int(stem_stride), bool(maxpool))
        super().__init__(depth="densessl", **kwargs)

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        kernel, stride, maxpool = self._stem
        self.conv1 = nn.Conv2d(in_channels, stem_channels, kernel_size=kernel, stride=stride, padding=kernel // 2,
                               bias=False)
        self.norm1_name, norm1 = build_norm_layer(self.norm_cfg, stem_channels, postfix=1)
        self.add_module(self.norm1_name, norm1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()


@MODELS.register_module()
class DenseSSLRes5Head(BaseModule):
    """res5 as the C4 RoI head (``layer4``), optionally followed by MoCo's extra norm (``extra_norm``)."""

    def __init__(self, block: str, in_channels: int, planes: int, num_blocks: int, stride: int = 2,
                 style: str = "pytorch", norm_cfg: dict[str, Any] | None = None, extra_norm: bool = True,
                 init_cfg: Any = None) -> None:
        init_cfg = init_cfg or [{"type": "Kaiming", "layer": "Conv2d"},
                                {"type": "Constant", "val": 1, "layer": ["_BatchNorm", "GroupNorm"]}]
        super().__init__(init_cfg)
        norm_cfg = norm_cfg or {"type": "BN", "requires_grad": True}
        block_cls = _BLOCKS[block]
        self.layer4 = ResLayer(block_cls, in_channels, planes, num_blocks, stride=stride, style=style,
                               norm_cfg=norm_cfg)
        self.extra_norm = build_norm_layer(norm_cfg, planes * block_cls.expansion)[1] if extra_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(x)
        return self.extra_norm(out) if self.extra_norm is not None else out
