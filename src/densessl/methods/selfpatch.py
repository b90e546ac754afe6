"""SelfPatch: patch-level self-distillation on top of DINO (Yun et al., CVPR 2022, arXiv 2206.07990).

Follows the official code alinlab/SelfPatch @ 81aef14 (``main_selfpatch.py``, ``selfpatch_vision_transformer.py``)
and the paper (arXiv 2206.07990). What SelfPatch adds to DINO:

* a backbone with **no CLS token and no final LayerNorm** (every output token is a patch);
* an aggregation head (``SelfPatchHead`` in the official code): two CaiT-style class-attention blocks that turn a
  learned query into (a) an image token over all patches and, for the teacher, (b) one token per patch that
  summarises the ``k_num`` most similar patches of its 3×3 neighbourhood (the patch itself excluded);
* a second DINO head (``p_head``, 4096-d) with its own centre, trained so that every student patch predicts the
  teacher's aggregate of its neighbours in the same view; total loss = image loss + 0.1 · patch loss.

Everything else (EMA teacher, schedules, clipping, last-layer freezing, photometric augmentations) is DINO's and
reused from :mod:`densessl.methods.dino`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.cait import ClassAttn
from torch import nn

from densessl.errors import ConfigError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.methods.dino import DINO, DINOHead, DINOLoss, MultiCropWrapper
from densessl.methods.selfpatch_config import SelfPatchConfig
from densessl.models.backbones import create_backbone
from densessl.models.variants import ARCH_VARIANTS
from densessl.train.schedules import teacher_temperature_schedule

# The SelfPatch ViT (selfpatch_vision_transformer.py ``VisionTransformer``): pos_embed (1, N, D), no cls_token,
# ``forward`` returns the un-normalised patch tokens of the last block.
SELFPATCH_ARCH_KWARGS: dict[str, Any] = ARCH_VARIANTS["selfpatch"]


# --------------------------------------------------------------------------------------------- neighbours
@functools.lru_cache(maxsize=32)
def neighbour_candidates(rows: int, cols: int, size: int = 3) -> torch.Tensor:
    """Flat indices (rows·cols, size²−1) of each patch's size×size window, the patch itself excluded.

    As ``SelfPatchHead.get_local_index``: row-major patch order, the window wraps around the border (a corner
    patch's candidates include patches of the opposite row/column), candidates listed in ascending flat index.
    The official code precomputes this for 14×14 and 6×6 grids only; here any grid of at least size×size.
    """
    if size < 3 or size % 2 == 0:
        raise ConfigError(f"method.neighbourhood_size={size}: must be an odd number ≥ 3 (official: 3)")
    if rows < size or cols < size:
        raise ConfigError(f"a {rows}×{cols} patch grid is smaller than the {size}×{size} neighbourhood, so the "
                          f"wrapped window would repeat patches; raise method.global_size/local_size or lower "
                          f"method.neighbourhood_size")
    radius = size // 2
    offsets = [(dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1) if (dr, dc) != (0, 0)]
    table = []
    for r in range(rows):
        for c in range(cols):
            table.append(sorted(((r + dr) % rows) * cols + (c + dc) % cols for dr, dc in offsets))
    return torch.tensor(table, dtype=torch.long)


def select_neighbours(tokens: torch.Tensor, grid: tuple[int, int], k: int, size: int = 3
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` candidates of every patch by cosine similarity (``SelfPatchHead.forward``, ``loc=True``).

    ``tokens`` (B, N, D) in row-major grid order. Returns the flat indices (B, N, k) of the chosen patches, most
    similar first, and their features (B, N, k, D).
    """
    b, n, d = tokens.shape
    rows, cols = grid
    if rows * cols != n:
        raise ValueError(f"grid {rows}×{cols} does not match {n} tokens")
    candidates = neighbour_candidates(rows, cols, size).to(tokens.device)  # (N, C)
    if k > candidates.shape[1]:
        raise ConfigError(f"method.k_num={k} exceeds the {candidates.shape[1]} candidates of a {size}×{size} "
                          f"neighbourhood; lower method.k_num (official: 4)")
    unit = F.normalize(tokens, dim=-1)
    similarity = torch.einsum("bnd,bncd->bnc", unit, unit[:, candidates])  # (B, N, C)
    top = similarity.topk(k, dim=-1).indices  # (B, N, k) positions within the candidate list
    chosen = torch.gather(candidates.expand(b, n, -1), 2, top)  # (B, N, k) flat patch indices
    features = torch.gather(tokens, 1, chosen.reshape(b, n * k, 1).expand(-1, -1, d)).reshape(b, n, k, d)
    return chosen, features


# --------------------------------------------------------------------------------------------- aggregation
class ClassAttentionBlock(nn.Module):
    """CaiT class-attention block as used by SelfPatch (``LayerScale_Block_CA``; despite the name no LayerScale).

    Only the query token is updated: pre-LN over [query; tokens], attention with the query as the sole query
    (timm's ``ClassAttn`` is the same module as the official ``Class_Attention``: separate q/k/v Linear), then a
    pre-LN MLP on the query. ``tokens`` pass through untouched.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        query = query + self.attn(self.norm1(torch.cat([query, tokens], dim=1)))
        return query + self.mlp(self.norm2(query))


class SelfPatchAggregation(nn.Module):
    """The official ``SelfPatchHead``: image token for everyone, neighbour aggregation for the teacher.

    Returns LayerNorm([image token; patch tokens]) of shape (B, 1 + N, D). With ``loc=False`` (student) the
    patch tokens are the backbone's own; with ``loc=True`` (teacher) token i is the class-attention summary of
    the ``k_num`` selected neighbours of patch i (the query attends over [query; neighbours], never patch i).
    Parameter names (``cls_token``, ``cls_blocks``, ``norm``) follow the official module.
    """

    def __init__(self, dim: int, num_heads: int, k_num: int, neighbourhood_size: int = 3, num_blocks: int = 2,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.k_num = k_num
        self.neighbourhood_size = neighbourhood_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_blocks = nn.ModuleList([ClassAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # SelfPatchHead._init_weights
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _attend(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.cls_token.expand(tokens.shape[0], -1, -1)
        for block in self.cls_blocks:
            query = block(tokens, query)
        return query

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], loc: bool) -> torch.Tensor:
        image = self._attend(tokens)  # (B, 1, D)
        if not loc:
            return self.norm(torch.cat([image, tokens], dim=1))
        b, n, d = tokens.shape
        _, neighbours = select_neighbours(tokens, grid, self.k_num, self.neighbourhood_size)
        aggregated = self._attend(neighbours.reshape(b * n, self.k_num, d)).reshape(b, n, d)
        return self.norm(torch.cat([image, aggregated], dim=1))


class SelfPatchHeads(nn.Module):
    """The three heads of the official ``MultiCropWrapper``: aggregation, image (65536-d), patch (4096-d)."""

    def __init__(self, ca_head: SelfPatchAggregation, c_head: DINOHead, p_head: DINOHead):
        super().__init__()
        self.ca_head = ca_head
        self.c_head = c_head
        self.p_head = p_head


class SelfPatchMultiCropWrapper(MultiCropWrapper):
    """DINO's wrapper with SelfPatch's heads: ``head`` holds ca_head, c_head and p_head.

    Crops of equal resolution share one backbone pass and one pass through the heads (the official loop calls
    the wrapper once for the globals and once for the locals). Returns the image logits of every crop, stacked
    in crop order (crops·B, out_dim), and one patch-logit tensor (B, N_v, out_dim_selfpatch) per crop.
    Checkpoint keys map to the official ones as ``head.ca_head.*`` ↔ ``ca_head.*`` (likewise c_head, p_head).
    """

    def __init__(self, backbone: nn.Module, heads: SelfPatchHeads):
        super().__init__(backbone, heads)

    def forward(self, crops: Sequence[torch.Tensor], loc: bool = False  # type: ignore[override]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        patch = self.backbone.patch_embed.patch_size
        p_h, p_w = (patch, patch) if isinstance(patch, int) else patch
        cls_logits: list[torch.Tensor] = []
        patch_logits: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = torch.cat(list(crops[start:end]))
            tokens = self.backbone.forward_features(x)  # (G·B, N, D): no prefix tokens, no final norm
            grid = (x.shape[-2] // p_h, x.shape[-1] // p_w)
            out = self.head.ca_head(tokens, grid, loc)
            cls_logits.append(self.head.c_head(out[:, 0]))
            n, d = out.shape[1] - 1, out.shape[2]
            # flattened so that a BatchNorm head normalises over patches (the official call on (B, N, D) would
            # treat N as BatchNorm1d channels and fail when use_bn_in_head is set)
            p = self.head.p_head(out[:, 1:].reshape(-1, d)).reshape(len(x), n, -1)
            patch_logits.extend(p.chunk(end - start))
            start = end
        return torch.cat(cls_logits), patch_logits


# --------------------------------------------------------------------------------------------- loss
class SelfPatchLoss(DINOLoss):
    """``DINOLoss`` of ``main_selfpatch.py``: DINO's image loss plus the same-view patch loss.

    * image loss: DINO's CE (teacher crops 0 and 1, every other student crop) — computed by :class:`DINOLoss`;
    * patch loss: for every crop v, CE between softmax((t_v − patch_center)/τ_t) of the teacher's aggregated
      neighbours and log_softmax(s_v/τ_s) of the student's own patches, mean over patches and batch, then over
      crops; total = image + ``patch_loss_weight`` · patch;
    * ``center`` from all crops' teacher image logits (``center_from_all_crops``) or the 2 global crops (DINO);
      ``patch_center`` (1, out_dim_selfpatch) from the mean over all patches of all teacher crops.
    Both centres use the same momentum and are updated after both losses are computed, as the official code.
    """

    def __init__(self, out_dim: int, out_dim_selfpatch: int, num_crops: int, teacher_temps: Any,
                 student_temp: float, center_momentum: float, patch_loss_weight: float,
                 center_from_all_crops: bool):
        super().__init__(out_dim, num_crops, teacher_temps, student_temp, center_momentum)
        self.patch_loss_weight = patch_loss_weight
        self.center_from_all_crops = center_from_all_crops
        self.register_buffer("patch_center", torch.zeros(1, out_dim_selfpatch))
        self._all_crops_teacher: torch.Tensor | None = None

    def update_center(self, teacher_out: torch.Tensor) -> None:
        # DINOLoss.forward hands over the 2 global crops; SelfPatch's official rule swaps in every crop.
        if self._all_crops_teacher is not None:
            teacher_out = self._all_crops_teacher
        super().update_center(teacher_out)

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor,  # type: ignore[override]
                student_patches: Sequence[torch.Tensor], teacher_patches: Sequence[torch.Tensor], epoch: int
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        if len(student_patches) != self.num_crops or len(teacher_patches) != self.num_crops:
            raise ValueError(f"expected {self.num_crops} crops of patch logits, got {len(student_patches)} "
                             f"(student) and {len(teacher_patches)} (teacher)")
        batch = teacher_cls.shape[0] // self.num_crops
        temp = float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])
        # patch loss first: DINOLoss.forward below moves the image centre, not the patch centre
        p_loss = student_cls.new_zeros(())
        patch_entropy = student_cls.new_zeros((), dtype=torch.float32)  # logs stay on the device (trainer.py)
        for s, t in zip(student_patches, teacher_patches):
            q = F.softmax((t - self.patch_center) / temp, dim=-1).detach()
            p_loss = p_loss + torch.sum(-q * F.log_softmax(s / self.student_temp, dim=-1), dim=-1).mean()
            with torch.no_grad():
                patch_entropy = patch_entropy + -(q * torch.log(q + 1e-12)).sum(-1).mean()
        p_loss = p_loss / self.num_crops
        self._all_crops_teacher = teacher_cls.detach() if self.center_from_all_crops else None
        try:
            c_loss, logs = super().forward(student_cls, teacher_cls[: 2 * batch], epoch)
        finally:
            self._all_crops_teacher = None
        self.update_patch_center(teacher_patches)
        loss = c_loss + self.patch_loss_weight * p_loss
        logs.update({"image_loss": c_loss.detach(), "patch_loss": p_loss.detach(),
                     "patch_teacher_entropy": patch_entropy / self.num_crops})
        return loss, logs

    @torch.no_grad()
    def update_patch_center(self, teacher_patches: Sequence[torch.Tensor]) -> None:
        """EMA of the mean over every patch of every teacher crop (``DINOLoss.update_patch_center``)."""
        total = sum(t.detach().sum(dim=(0, 1)) for t in teacher_patches).unsqueeze(0)
        count = torch.tensor(float(sum(t.shape[0] * t.shape[1] for t in teacher_patches)), device=total.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.patch_center.mul_(self.center_momentum).add_(total / count * (1 - self.center_momentum))


# --------------------------------------------------------------------------------------------- method
@register
class SelfPatch(DINO):
    """DINO + SelfPatch. Reuses DINO's views, EMA update, last-layer freezing and export."""

    name = "selfpatch"
    config_cls = SelfPatchConfig

    def __init__(self, arch: str, config: dict[str, Any] | SelfPatchConfig | None, epochs: int):
        PretrainMethod.__init__(self)  # DINO.__init__ would build DINO's single-head wrapper
        cfg = config if isinstance(config, SelfPatchConfig) else \
            build_dataclass(SelfPatchConfig, config, "method config (selfpatch)")
        self.cfg = cfg
        self.arch = arch
        self.arch_kwargs = dict(SELFPATCH_ARCH_KWARGS)  # how the exported backbone is rebuilt
        self._check(cfg)
        student_backbone = create_backbone(arch, drop_path_rate=cfg.drop_path_rate, **self.arch_kwargs)
        teacher_backbone = create_backbone(arch, **self.arch_kwargs)
        patch = student_backbone.patch_embed.patch_size[0]
        for field in ("global_size", "local_size"):
            size = getattr(cfg, field)
            if field == "local_size" and cfg.local_crops_number == 0:
                continue
            if size % patch or size // patch < cfg.neighbourhood_size:
                raise ConfigError(f"method.{field}={size}: must be a multiple of the patch size {patch} giving a "
                                  f"grid of at least {cfg.neighbourhood_size}×{cfg.neighbourhood_size} patches "
                                  f"(SelfPatch's neighbourhood); e.g. {patch * max(cfg.neighbourhood_size, 4)}")
        self.student = self._wrapper(student_backbone, cfg, cfg.norm_last_layer)
        # teacher heads are built with norm_last_layer=True (main_selfpatch.py), then take the student's weights
        self.teacher = self._wrapper(teacher_backbone, cfg, True)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        temps = teacher_temperature_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                             cfg.warmup_teacher_temp_epochs, epochs)
        self.criterion = SelfPatchLoss(cfg.out_dim, cfg.out_dim_selfpatch, 2 + cfg.local_crops_number, temps,
                                       cfg.student_temp, cfg.center_momentum, cfg.patch_loss_weight,
                                       cfg.center_from_all_crops)

    @staticmethod
    def _check(cfg: SelfPatchConfig) -> None:
        candidates = cfg.neighbourhood_size ** 2 - 1
        if cfg.neighbourhood_size < 3 or cfg.neighbourhood_size % 2 == 0:
            raise ConfigError(f"method.neighbourhood_size={cfg.neighbourhood_size}: must be odd and ≥ 3 (official: 3)")
        if not 1 <= cfg.k_num <= candidates:
            raise ConfigError(f"method.k_num={cfg.k_num}: must lie in 1..{candidates} for a "
                              f"{cfg.neighbourhood_size}×{cfg.neighbourhood_size} neighbourhood (official: 4)")
        if cfg.patch_loss_weight < 0:
            raise ConfigError(f"method.patch_loss_weight={cfg.patch_loss_weight}: must be ≥ 0 (official: 0.1)")
        if cfg.num_ca_blocks < 1:
            raise ConfigError(f"method.num_ca_blocks={cfg.num_ca_blocks}: must be ≥ 1 (official: 2)")

    @staticmethod
    def _wrapper(backbone: nn.Module, cfg: SelfPatchConfig, norm_last_layer: bool) -> SelfPatchMultiCropWrapper:
        dim = backbone.embed_dim
        num_heads = backbone.blocks[0].attn.num_heads  # main_selfpatch.py passes the backbone's head count
        head_args = dict(use_bn=cfg.use_bn_in_head, norm_last_layer=norm_last_layer, hidden_dim=cfg.hidden_dim,
                         bottleneck_dim=cfg.bottleneck_dim)
        heads = SelfPatchHeads(
            SelfPatchAggregation(dim, num_heads, cfg.k_num, cfg.neighbourhood_size, cfg.num_ca_blocks,
                                 cfg.ca_mlp_ratio),
            DINOHead(dim, cfg.out_dim, **head_args),
            DINOHead(dim, cfg.out_dim_selfpatch, **head_args),
        )
        return SelfPatchMultiCropWrapper(backbone, heads)

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        crops = batch["crops"]
        with torch.no_grad():  # the teacher sees every crop, with neighbour aggregation (loc=True)
            teacher_cls, teacher_patches = self.teacher(crops, loc=True)
        student_cls, student_patches = self.student(crops, loc=False)
        return self.criterion(student_cls, teacher_cls, student_patches, teacher_patches, epoch)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"center": self.criterion.center.detach().clone(),
                "patch_center": self.criterion.patch_center.detach().clone()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.criterion.center.copy_(state["center"])
        self.criterion.patch_center.copy_(state["patch_center"])
