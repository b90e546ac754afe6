"""Our timm ViT backbones in mmsegmentation's ``VisionTransformer`` key layout.

The renames are those of mmseg's own converter ``tools/model_converters/vit2mmseg.py`` (which SelfPatch's
repository ships modified and GTSA uses as is): ``patch_embed.proj`` → ``patch_embed.projection``,
``blocks.i`` → ``layers.i``, ``norm1/2`` → ``ln1/2``, ``attn.qkv`` → ``attn.attn.in_proj_*``, ``attn.proj`` →
``attn.attn.out_proj``, ``mlp.fc1`` → ``ffn.layers.0.0``, ``mlp.fc2`` → ``ffn.layers.1``, final ``norm`` →
``ln1``. Every key of the timm state dict is either mapped or refused: nothing is dropped silently, except the
final norm when the protocol builds mmseg's ViT without one (``final_norm=False``, as every official config
here does), which is then listed in :attr:`MMSegViT.dropped`.

mmseg's ViT always holds a ``cls_token`` and a position embedding with one class slot; with
``with_cls_token=False`` it drops that token before the first block. Backbones trained without a class
token (SelfPatch's, LOCA's) are therefore exported with a zero ``cls_token`` and a zero class slot in
``pos_embed``, which leaves their computation unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from densessl.errors import CheckpointError, ConfigError
from densessl.io import atomic_path
from densessl.models.backbones import ResNetTokens

# timm modules that exist on every timm ViT but hold no weights in ours (Identity) are absent from the state
# dict; the pattern table covers every key our backbones do have.
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"norm1\.(weight|bias)$", r"ln1.\1"),
    (r"norm2\.(weight|bias)$", r"ln2.\1"),
    (r"attn\.qkv\.(weight|bias)$", r"attn.attn.in_proj_\1"),
    (r"attn\.proj\.(weight|bias)$", r"attn.attn.out_proj.\1"),
    (r"mlp\.fc1\.(weight|bias)$", r"ffn.layers.0.0.\1"),
    (r"mlp\.fc2\.(weight|bias)$", r"ffn.layers.1.\1"),
)


@dataclass(frozen=True)
class ViTSpec:
    """The architecture fields mmseg's ``VisionTransformer`` needs, read off one of our timm ViTs."""

    embed_dims: int
    num_layers: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    img_size: int
    class_token: bool
    has_final_norm: bool
    gelu_tanh: bool

    def out_indices(self) -> tuple[int, ...]:
        """Four evenly spaced blocks, the last included: (2, 5, 8, 11) for 12 blocks, as the official SelfPatch
        and GTSA configs (``out_indices=(2, 5, 8, 11)``); (5, 11, 17, 23) for ViT-L's 24."""
        n = self.num_layers
        if n < 4:
            raise ConfigError(f"the mmseg protocols take four block outputs; this ViT has {n} blocks")
        return tuple(n * (k + 1) // 4 - 1 for k in range(4))


@dataclass
class MMSegViT:
    """An exported state dict plus what was left out of it."""

    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)


def _int_if_whole(value: float) -> float:
    return int(value) if float(value).is_integer() else value


def vit_spec(backbone: nn.Module) -> ViTSpec:
    """Read the architecture of a timm ``VisionTransformer``; a ResNet or other model is refused in one line."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, ResNetTokens) or not isinstance(backbone, VisionTransformer):
        raise ConfigError(f"the mmseg ViT protocols take a ViT backbone, got a {type(getattr(backbone, 'resnet', backbone)).__name__}; "
                          f"ResNet rows are not evaluated by semfpn_ade20k/upernet_ade20k")
    block = backbone.blocks[0]
    if block.attn.qkv.bias is None:
        raise ConfigError("mmseg's ViT builds qkv with a bias (qkv_bias=True); this backbone has none")
    if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
        raise ConfigError("mmseg's ViT has no layer scale; this backbone uses it (init_values)")
    act = block.mlp.act
    patch = backbone.patch_embed.patch_size
    img = backbone.patch_embed.img_size
    return ViTSpec(
        embed_dims=backbone.embed_dim,
        num_layers=len(backbone.blocks),
        num_heads=block.attn.num_heads,
        # mmseg multiplies it into the FFN width, which must be an int: 4, not 4.0
        mlp_ratio=_int_if_whole(block.mlp.fc1.out_features / backbone.embed_dim),
        patch_size=int(patch[0]),
        img_size=int(img[0]),
        class_token=backbone.cls_token is not None,
        has_final_norm=not isinstance(backbone.norm, nn.Identity),
        gelu_tanh=getattr(act, "approximate", "none") == "tanh",
    )


def to_mmseg_vit(state: dict[str, torch.Tensor], class_token: bool, final_norm: bool) -> MMSegViT:
    """Rename a timm ViT state dict into mmseg's ViT layout (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        value = value.detach().cpu()
        if key == "cls_token":
            out["cls_token"] = value
        elif key == "pos_embed":
            out["pos_embed"] = value if class_token else torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], 1)
        elif key.startswith("patch_embed.proj."):
            out["patch_embed.projection." + key.rsplit(".", 1)[1]] = value
        elif key in ("norm.weight", "norm.bias"):
            if final_norm:
                out["ln1." + key.rsplit(".", 1)[1]] = value
            else:
                dropped.append(key)
        elif m := re.match(r"blocks\.(\d+)\.(.+)$", key):
            for pattern, target in _BLOCK_RULES:
                if re.match(pattern, m.group(2)):
                    out[f"layers.{m.group(1)}." + re.sub(pattern, target, m.group(2))] = value
                    break
            else:
                raise CheckpointError(f"backbone key {key!r} has no counterpart in mmseg's ViT")
        else:
            raise CheckpointError(f"backbone key {key!r} has no counterpart in mmseg's ViT")
    if not class_token:
        out["cls_token"] = out["pos_embed"].new_zeros(1, 1, out["pos_embed"].shape[-1])
    return MMSegViT(out, dropped)


def export_mmseg_vit(backbone: nn.Module, path: Path, final_norm: bool) -> tuple[ViTSpec, MMSegViT]:
    """Write ``backbone`` as safetensors in mmseg's ViT layout (atomically); return its spec and the export."""
    from safetensors.torch import save_file

    spec = vit_spec(backbone)
    if final_norm and not spec.has_final_norm:
        raise ConfigError("final_norm: true, but this backbone has no final LayerNorm (SelfPatch's ViT); "
                          "set final_norm: false")
    exported = to_mmseg_vit(backbone.state_dict(), spec.class_token, final_norm)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in exported.state.items()}, str(tmp))
    return spec, exported
