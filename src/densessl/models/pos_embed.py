"""Positional-embedding resampling for a ViT that sees a grid other than its native one.

Why one module: the official codes resample differently, and the difference is visible in the tokens (on a
160×224 input, timm's exact-size bicubic with antialias moves a DINO ViT's tokens by about 1e-2 relative
from DINO's own). So the rule is a property of the backbone (``pos_resample``), chosen per method and per
import format, and used in training (96-px local crops, LOCA's queries) and in every dense evaluation alike:

- ``"dino"``: DINO's ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino @ 7c446df,
  ``vision_transformer.py``), which SelfPatch (alinlab/SelfPatch ``selfpatch_vision_transformer.py``) and
  GTSA (a DINO ViT) inherit: bicubic ``F.interpolate`` with ``scale_factor`` (h0 + 0.1)/√N by (w0 + 0.1)/√N,
  no antialias; the scale factor, not the size ratio, places the samples. The early exit applies only
  when the grid equals the native square one (``npatch == N and w == h``).
- ``"scenic"``: LOCA's ``ToTokenSequence`` (google-research/scenic ``projects/loca/vit.py``):
  ``jax.image.resize(posemb, (1, h, w, c), 'bilinear')``, whose default ``antialias=True`` widens the
  triangle kernel when downsampling; torch's bilinear with ``antialias=True`` is the same filter.
- ``"timm"``: timm's ``resample_abs_pos_embed`` (bicubic to the exact size, antialias), for comparison and
  for backbones trained with timm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from densessl.errors import ConfigError

POS_RESAMPLE = ("dino", "scenic", "timm")


def resample_grid(grid: torch.Tensor, new_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample a (1, H0, W0, D) positional grid to (1, h, w, D) by the rule ``mode`` (see module docstring)."""
    h0, w0 = grid.shape[1:3]
    h, w = new_hw
    if mode not in POS_RESAMPLE:
        raise ConfigError(f"pos_resample={mode!r}: choose one of {list(POS_RESAMPLE)}")
    if (h, w) == (h0, w0):
        return grid
    dtype = grid.dtype
    x = grid.float().permute(0, 3, 1, 2)
    if mode == "dino":
        if h0 != w0:
            raise ConfigError(f"pos_resample='dino' needs a square native grid, got {h0}×{w0}; "
                              f"use pos_resample='timm' for this backbone")
        side = math.sqrt(h0 * w0)
        x = F.interpolate(x, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
        if tuple(x.shape[-2:]) != (h, w):  # the official assert: int(w0) == shape[-2], int(h0) == shape[-1]
            raise RuntimeError(f"DINO pos-embed interpolation gave {tuple(x.shape[-2:])}, expected {(h, w)}")
    elif mode == "scenic":
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    else:
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).to(dtype)


class ResampledViT(VisionTransformer):
    """timm ``VisionTransformer`` whose positional embedding follows ``pos_resample`` at non-native grids.

    Only ``_pos_embed`` changes, so ``forward_features``, ``forward_intermediates`` and state-dict keys are
    timm's. Needs ``dynamic_img_size=True`` (the patch embedding then keeps the (B, H, W, D) grid).
    """

    def __init__(self, *args, pos_resample: str = "dino", **kwargs):
        if pos_resample not in POS_RESAMPLE:
            raise ConfigError(f"pos_resample={pos_resample!r}: choose one of {list(POS_RESAMPLE)}")
        super().__init__(*args, **kwargs)
        self.pos_resample = pos_resample

    def resampled_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, prefix + h·w, D) if the embedding carries prefix slots, else (1, h·w, D)."""
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = self.pos_embed
        gh, gw = self.patch_embed.grid_size
        grid = resample_grid(pos[:, prefix:].reshape(1, gh, gw, -1), (h, w), self.pos_resample)
        return torch.cat([pos[:, :prefix], grid.reshape(1, h * w, -1)], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None or not self.dynamic_img_size or self.pos_resample == "timm":
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        pos = self.resampled_pos_embed(h, w)
        x = x.reshape(b, h * w, c)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.pos_drop(x)
