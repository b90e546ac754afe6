"""The geometry of an exported backbone as the detectors need it: family, channels and stride of each level.

Why a separate description: the detector config (FPN input channels, RoI extractor strides, anchor strides, the
C4 head's widths) must follow the backbone, which is ResNet-50 / ViT-S/16 at paper scale and the narrow smoke
networks (``resnet-tiny``: BasicBlock [1, 1, 1, 1], widths 16..128, output stride 8; ``vit-tiny-p8``) at smoke
scale. Everything is read from the architecture name and keyword arguments stored with the backbone
(checkpoints/io.py), so the config is built without loading weights or importing mmdet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from densessl.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    family: str                        # "resnet" | "vit"
    arch: str
    arch_kwargs: dict[str, Any]
    channels: tuple[int, ...]          # per level: ResNet layer1..4 outputs; ViT: embed_dim four times
    strides: tuple[int, ...]           # per level, pixels (ViT: after the multi-level adaptor)
    # ResNet only
    block: str = ""                    # "basic" | "bottleneck"
    stage_blocks: tuple[int, ...] = ()
    stage_strides: tuple[int, ...] = ()
    base_channels: int = 64
    # where a strided bottleneck strides: "pytorch" (3x3 conv, torchvision) or "caffe" (1x1 conv; MSRA's R-50,
    # arch_kwargs stride_in_1x1=True, models/resnet.py); mmdet's ResNet/ResLayer take the same word
    style: str = "pytorch"
    stem: dict[str, Any] | None = None  # None: torchvision's 7x7/2 conv + 3x3/2 max-pool
    # ViT only
    patch_size: int = 16
    depth: int = 12
    num_heads: int = 6

    @property
    def is_standard_resnet50(self) -> bool:
        return self.arch == "resnet50"


def backbone_spec(arch: str, arch_kwargs: dict[str, Any]) -> BackboneSpec:
    from densessl.models.backbones import VIT_ARCHS, vit_kwargs
    from densessl.models.resnet import RESNET_ARCHS, TinyResNetSpec

    if arch in RESNET_ARCHS:
        if arch == "resnet50":
            unsupported = sorted(set(arch_kwargs) - {"zero_init_residual", "num_classes", "stride_in_1x1"})
            if unsupported:
                raise ConfigError(f"arch resnet50 with {unsupported}: the detection export takes the standard "
                                  f"torchvision ResNet-50 only (pytorch or caffe stride placement)")
            return BackboneSpec(family="resnet", arch=arch, arch_kwargs=dict(arch_kwargs),
                                channels=(256, 512, 1024, 2048), strides=(4, 8, 16, 32), block="bottleneck",
                                stage_blocks=(3, 4, 6, 3), stage_strides=(1, 2, 2, 2), base_channels=64,
                                style="caffe" if arch_kwargs.get("stride_in_1x1") else "pytorch")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in arch_kwargs.items()}
        spec = TinyResNetSpec(**values)
        widths = spec.widths
        if any(w != widths[0] * 2**i for i, w in enumerate(widths)):
            raise ConfigError(f"arch {arch}: widths {list(widths)} must double per stage (mmdet's ResNet builds "
                              f"base_channels * 2**i)")
        expansion = 4 if spec.block == "bottleneck" else 1
        stride = spec.stem_stride * (2 if spec.maxpool else 1)
        strides = []
        for s in spec.strides:
            stride *= s
            strides.append(stride)
        return BackboneSpec(family="resnet", arch=arch, arch_kwargs=dict(arch_kwargs),
                            channels=tuple(w * expansion for w in widths), strides=tuple(strides),
                            block=spec.block, stage_blocks=tuple(spec.layers), stage_strides=tuple(spec.strides),
                            base_channels=widths[0],
                            stem={"channels": spec.stem_width, "kernel": spec.stem_kernel,
                                  "stride": spec.stem_stride, "maxpool": spec.maxpool})
    if arch in VIT_ARCHS:
        kw = vit_kwargs(arch, **arch_kwargs)
        patch = int(kw["patch_size"])
        if patch & (patch - 1):
            raise ConfigError(f"arch {arch}: patch size {patch} is not a power of two; the multi-level adaptor "
                              f"reaches strides 4..32 by 2x up-convolutions and poolings")
        return BackboneSpec(family="vit", arch=arch, arch_kwargs=dict(arch_kwargs),
                            channels=(int(kw["embed_dim"]),) * 4, strides=(4, 8, 16, 32), patch_size=patch,
                            depth=int(kw["depth"]), num_heads=int(kw["num_heads"]))
    raise ConfigError(f"arch {arch!r}: no detection backbone for it; known: {sorted(RESNET_ARCHS) + sorted(VIT_ARCHS)}")


def vit_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks whose outputs feed the adaptor: 3, 5, 7, 11 for depth 12 (SelfPatch/GTSA ``out_indices``), the
    same fractions (4/12, 6/12, 8/12, 12/12 of the depth) for other depths."""
    return tuple(max(0, round(depth * k / 12) - 1) for k in (4, 6, 8, 12))


def adaptor_factors(patch_size: int, strides: tuple[int, ...] = (4, 8, 16, 32)) -> tuple[float, ...]:
    """Resampling factor of each adaptor level: > 1 up-convolves, < 1 max-pools (patch 16: 4, 2, 1, 1/2)."""
    out = []
    for s in strides:
        f = patch_size / s
        if f >= 1 and not math.log2(f).is_integer() or f < 1 and not math.log2(1 / f).is_integer():
            raise ConfigError(f"patch size {patch_size} cannot reach stride {s} by factors of two")
        out.append(f)
    return tuple(out)
