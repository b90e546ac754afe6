"""Patch-Seg output heads and the backbone tokens each one reads.

iancovert/patch-seg @ fc14f36:

* ``scripts/train.py``: ``prepare_backbone`` (the token mode the backbone's forward is cut to) and
  ``prepare_output_head`` (which head, its output mode, ``assert label_reduction == "union"`` for the two
  intervention heads);
* ``patchseg/model.py``: ``MLP``, ``Transformer`` and ``TransformerIntervention``.

The heads (``--output-head``):

* ``linear``, ``mlp``: per token, on the patch tokens (the prefix mean, or the token mean without prefix
  tokens, for ``global-union``);
* ``transformer`` (official default): a learned positional embedding over all backbone tokens, then blocks;
  predictions are read at the patch tokens (or pooled for ``global-union``);
* ``transformer-cls`` and ``transformer-separate`` (the official intervention heads, ``union`` only):
  ``TransformerIntervention`` appends one learned latent token per patch, with no positional embedding on the
  backbone tokens, and reads the predictions at the latent tokens. ``-cls`` gives it only the backbone's
  prefix token (the mean of the prefix tokens, or the mean of all tokens for a backbone without one), so every
  patch's prediction must come from the global token; ``-separate`` gives it all tokens, but each patch's
  prediction is read at a latent token, not at that patch's own token.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from densessl.errors import ConfigError
from densessl.evaluate.patchseg_config import HEADS, UNION_ONLY_HEADS, check_head  # noqa: F401  (re-exported)


def feature_mode(head: str, reduction: str, num_prefix_tokens: int) -> str:
    """Which tokens the backbone hands to the head (official ``prepare_backbone``)."""
    pooled = "keep_prefix" if num_prefix_tokens > 0 else "mean"
    if head in ("linear", "mlp"):
        return pooled if reduction == "global-union" else "keep_suffix"
    if head == "transformer-cls":
        return pooled
    return "keep_all"  # transformer, transformer-separate


def _blocks(embed_dim: int, num_heads: int, num_layers: int) -> nn.Sequential:
    """The official heads' timm Blocks ("parameters set to match ViT-B architecture")."""
    return nn.Sequential(*[
        Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=4, qkv_bias=False, qk_norm=False, init_values=0.01,
              proj_drop=0.0, attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm, act_layer=nn.GELU,
              mlp_layer=Mlp)
        for _ in range(num_layers)])


class MLPHead(nn.Module):
    """Official ``MLP``: Linear - GELU - Linear per token."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(x)))


class TransformerHead(nn.Module):
    """Official ``Transformer`` head: learned PE N(0, 0.02) over all tokens, LN, timm Blocks (qkv_bias
    False, LayerScale 0.01, mlp_ratio 4, no dropout), LN, Linear; output patch tokens (``keep_suffix``),
    the prefix mean (``keep_prefix``) or the token mean (``mean``)."""

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int, num_tokens: int,
                 num_prefix_tokens: int, mode: str, num_layers: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.mode = mode
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, embed_dim) * 0.02)
        self.norm_pre = nn.LayerNorm(embed_dim)
        self.blocks = _blocks(embed_dim, num_heads, num_layers)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.norm(self.blocks(self.norm_pre(x + self.pos_embed))))
        if self.mode == "keep_suffix":
            return x[:, self.num_prefix_tokens:]
        if self.mode == "keep_prefix":
            return x[:, : self.num_prefix_tokens].mean(dim=1, keepdim=True)
        return x.mean(dim=1, keepdim=True)


class TransformerIntervention(nn.Module):
    """Official ``TransformerIntervention`` (``transformer-cls`` / ``transformer-separate``): the backbone
    tokens (any number, no positional embedding added) followed by ``num_latent_tokens`` learned latent tokens
    N(0, 0.02), LN, the same timm Blocks as :class:`TransformerHead`, LN, Linear; the output is the latent
    tokens' (B, num_latent_tokens, C). Parameters are created in the official order (latents, norm_pre, blocks,
    norm, head), so a seed initialises them as the official module does."""

    def __init__(self, num_latent_tokens: int, embed_dim: int, num_heads: int, num_classes: int,
                 num_layers: int) -> None:
        super().__init__()
        self.num_latent_tokens = num_latent_tokens
        self.latent_embed = nn.Parameter(torch.randn(num_latent_tokens, embed_dim) * 0.02)
        self.norm_pre = nn.LayerNorm(embed_dim)
        self.blocks = _blocks(embed_dim, num_heads, num_layers)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, self.latent_embed.expand(x.shape[0], -1, -1)], dim=1)
        x = self.head(self.norm(self.blocks(self.norm_pre(x))))
        return x[:, -self.num_latent_tokens:]


def build_head(head: str, label_reduction: str, embed_dim: int, num_heads: int, num_prefix_tokens: int,
               num_patches: int, num_classes: int, hidden_size: int, num_layers: int) -> nn.Module:
    """The official ``prepare_output_head``."""
    check_head(head, label_reduction)
    if head == "linear":
        return nn.Linear(embed_dim, num_classes)
    if head == "mlp":
        return MLPHead(embed_dim, hidden_size, num_classes)
    if head == "transformer":
        mode = ("keep_prefix" if num_prefix_tokens > 0 else "mean") if label_reduction == "global-union" \
            else "keep_suffix"
        return TransformerHead(embed_dim, num_heads, num_classes, num_patches + num_prefix_tokens,
                               num_prefix_tokens, mode, num_layers)
    if head in UNION_ONLY_HEADS:
        return TransformerIntervention(num_patches, embed_dim, num_heads, num_classes, num_layers)
    raise ConfigError(f"patchseg config: head={head!r} is not one of {list(HEADS)}")
