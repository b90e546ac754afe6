"""ResNet backbones by name, with torchvision's module names so official checkpoints load unchanged.

CLoVE and PixPro train a torchvision-named ResNet-50 and evaluate its last feature map (C5) as a dense grid
(sthalles/CLoVE @ d706573 ``contrast/resnet.py``, ``head_type='early_return'``; its checkpoints load
into ``torchvision.models.resnet50`` after stripping ``module.encoder.``). Every architecture here is an
instance of
``torchvision.models.ResNet`` (never a hub download), so ``state_dict`` keys are torchvision's:
``conv1``, ``bn1``, ``layer1..4.<i>.{conv,bn}*``, ``downsample.{0,1}``, ``fc``.

- ``resnet50``: ``torchvision.models.resnet50(weights=None)``: Bottleneck [3, 4, 6, 3], stride in the 3×3
  conv ("pytorch" style, as CLoVE's ``contrast/resnet.py``), C5 = 2048 channels at output stride 32.
- ``resnet50`` with ``stride_in_1x1=True``: the same modules and names with the stride of each stage's first
  block in its 1×1 ``conv1`` instead of the 3×3 ``conv2`` ("caffe" style, detectron2 ``STRIDE_IN_1X1: True``),
  the network of MSRA's caffe2 ResNet-50 (``checkpoints/msra.py``); only the placement of one stride differs,
  so every key and shape is torchvision's.
- ``resnet-tiny`` (smoke scale): the same ``ResNet`` class with BasicBlock [1, 1, 1, 1], widths
  (16, 32, 64, 128), a 16-channel 3×3 stride-2 stem without max-pool and layer strides (1, 2, 2, 1):
  output stride 8 and 128 channels, so a 64-px image gives an 8×8 grid of 128-d features, the same grid and
  width as the smoke ViT ``vit-tiny-p8``; about 54 MFLOPs per 64-px image
  (``vit-tiny-p8``: 105).

The ``fc`` classifier is kept (so keys equal torchvision's) but dense methods never call it: they use
:func:`feature_grid`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from densessl.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TinyResNetSpec:
    """A narrow torchvision ``ResNet``: few blocks, small widths, configurable stem (smoke scale)."""

    block: str = "basic"                          # basic | bottleneck (torchvision block classes)
    layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)   # `planes` of layer1..4 (× block expansion)
    strides: tuple[int, int, int, int] = (1, 2, 2, 1)
    stem_width: int = 16
    stem_kernel: int = 3
    stem_stride: int = 2
    maxpool: bool = False                         # torchvision's 3×3/2 max-pool after the stem
    zero_init_residual: bool = False              # torchvision ResNet(zero_init_residual=...)
    num_classes: int = 1000                       # only the unused ``fc`` head; kept for key parity


# name → native input size (the img_size reported by resnet_info) and the name reports print
RESNET_ARCHS: dict[str, dict[str, Any]] = {
    "resnet50": dict(img_size=224, display="ResNet-50"),
    "resnet-tiny": dict(img_size=64, display="ResNet-Tiny (smoke)"),
}
RESNET_DISPLAY = {name: spec["display"] for name, spec in RESNET_ARCHS.items()}

# Keyword arguments torchvision.models.resnet50 accepts besides `weights`/`progress` (ResNet.__init__).
_TORCHVISION_KWARGS = ("num_classes", "zero_init_residual", "groups", "width_per_group",
                       "replace_stride_with_dilation", "norm_layer")


class TinyResNet(ResNet):
    """torchvision ``ResNet`` with explicit widths/strides/stem; reuses ResNet's ``_make_layer`` and forward.

    ``ResNet.__init__`` hard-codes 64..512 planes and a stride-4 stem, which gives a 2×2 map at 64 px; this
    subclass sets the same attributes with smaller numbers, so every module name stays torchvision's.
    """

    def __init__(self, spec: TinyResNetSpec) -> None:
        nn.Module.__init__(self)
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if spec.block not in blocks:
            raise ConfigError(f"arch resnet-tiny: block={spec.block!r}; allowed values: {sorted(blocks)}")
        block: type[BasicBlock | Bottleneck] = blocks[spec.block]
        self.spec = spec
        self._norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d
        self.inplanes = spec.stem_width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, spec.stem_width, kernel_size=spec.stem_kernel, stride=spec.stem_stride,
                               padding=spec.stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if spec.maxpool else nn.Identity()
        self.layer1 = self._make_layer(block, spec.widths[0], spec.layers[0], stride=spec.strides[0])
        self.layer2 = self._make_layer(block, spec.widths[1], spec.layers[1], stride=spec.strides[1])
        self.layer3 = self._make_layer(block, spec.widths[2], spec.layers[2], stride=spec.strides[2])
        self.layer4 = self._make_layer(block, spec.widths[3], spec.layers[3], stride=spec.strides[3])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(spec.widths[3] * block.expansion, spec.num_classes)
        # torchvision ResNet.__init__ initialisation (kaiming fan_out, BN 1/0, optional zero last-BN gamma)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if spec.zero_init_residual:
            _zero_last_bn(self)


def _zero_last_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.bn3.weight is not None:
            nn.init.constant_(m.bn3.weight, 0)
        elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
            nn.init.constant_(m.bn2.weight, 0)


def create_resnet(arch: str, **overrides: Any) -> ResNet:
    """Build ``arch`` with random weights.

    ``overrides`` go to ``torchvision.models.resnet50`` for ``resnet50`` (e.g. ``zero_init_residual=True``,
    which with torchvision's kaiming fan-out init reproduces CLoVE's ``contrast/resnet.py`` init exactly:
    normal(0, sqrt(2/n)), n = k·k·out_channels, BN γ=1/β=0, each bottleneck's ``bn3.weight`` = 0) and to
    :class:`TinyResNetSpec` fields for ``resnet-tiny``.
    """
    if arch not in RESNET_ARCHS:
        raise ConfigError(f"unknown ResNet architecture {arch!r}; choose one of {sorted(RESNET_ARCHS)}")
    if arch == "resnet50":
        overrides = dict(overrides)
        stride_in_1x1 = bool(overrides.pop("stride_in_1x1", False))
        unknown = sorted(set(overrides) - set(_TORCHVISION_KWARGS))
        if unknown:
            raise ConfigError(f"arch resnet50: unknown option(s) {unknown}; valid: "
                              f"{sorted([*_TORCHVISION_KWARGS, 'stride_in_1x1'])}")
        model: ResNet = torchvision.models.resnet50(weights=None, **overrides)
        if stride_in_1x1:
            move_stride_to_1x1(model)
    else:
        names = {f.name for f in dataclasses.fields(TinyResNetSpec)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"arch {arch}: unknown option(s) {unknown}; valid: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        model = TinyResNet(TinyResNetSpec(**values))
    model.densessl_arch = arch  # type: ignore[assignment]  # lets resnet_info report the native image size
    return model


def move_stride_to_1x1(model: ResNet) -> ResNet:
    """Caffe-style placement: in each strided bottleneck, ``conv1`` (1×1) takes the stride and ``conv2`` (3×3)
    runs at stride 1 (detectron2 ``BottleneckBlock(stride_in_1x1=True)``; mmdet ``Bottleneck(style='caffe')``).
    The shortcut (``downsample``) keeps its stride-2 1×1 conv in both styles."""
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            if not isinstance(block, Bottleneck):
                raise ConfigError("stride_in_1x1 applies to bottleneck ResNets only")
            stride = block.conv2.stride
            if stride != (1, 1):
                block.conv1.stride, block.conv2.stride = stride, (1, 1)
    return model


def is_stride_in_1x1(model: nn.Module) -> bool:
    """True when some bottleneck of ``model`` carries its stride in the 1×1 ``conv1`` (caffe style)."""
    return any(isinstance(m, Bottleneck) and m.conv1.stride != (1, 1) for m in model.modules())


@dataclass(frozen=True)
class ResNetInfo:
    """Geometry of the last feature map. ``patch_size``/``embed_dim``/``num_prefix_tokens`` mirror
    ``backbones.BackboneInfo`` so dense evaluations can treat C5 cells like ViT patches."""

    output_stride: int
    feature_dim: int
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def patch_size(self) -> int:
        return self.output_stride

    @property
    def embed_dim(self) -> int:
        return self.feature_dim

    @property
    def num_prefix_tokens(self) -> int:
        return 0


def _stride(module: nn.Module) -> int:
    s = getattr(module, "stride", 1)
    return int(s[0] if isinstance(s, tuple) else s)


def is_resnet(model: nn.Module) -> bool:
    return isinstance(model, ResNet)


def resnet_info(model: nn.Module) -> ResNetInfo:
    """Output stride and channel count of ``layer4``, read from the modules (dilation-aware: torchvision
    turns a dilated stage's stride into 1, and each block stores its own ``stride``)."""
    if not is_resnet(model):
        raise ConfigError(f"resnet_info: expected a torchvision ResNet, got {type(model).__name__}")
    stride = _stride(model.conv1)
    if isinstance(model.maxpool, nn.MaxPool2d):
        stride *= _stride(model.maxpool)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        stride *= math.prod(int(block.stride) for block in layer)
    last = model.layer4[-1]
    dim = last.bn3.num_features if isinstance(last, Bottleneck) else last.bn2.num_features
    img = RESNET_ARCHS.get(getattr(model, "densessl_arch", "resnet50"), {"img_size": 224})["img_size"]
    return ResNetInfo(output_stride=stride, feature_dim=int(dim), img_size=int(img))


def feature_grid(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last feature map (B, C, H/s, W/s): stem → layer1..4, no pooling or ``fc`` (CLoVE/PixPro
    ``head_type='early_return'``, contrast/resnet.py ``ResNet.forward``)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    return model.layer4(x)
