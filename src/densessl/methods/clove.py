"""CLoVE: contextualized local visual embeddings (Silva, Pedrini, Ramírez Rivera, arXiv 2310.00527).

Follows the official code sthalles/CLoVE @ d706573: ``contrast/models/CLoVE.py``
(encoder, projector, ``nn.MultiheadAttention`` contextualisation, momentum encoder), ``contrast/loss.py``
(``TripletLoss``: PixPro positive geometry + ranking loss), ``contrast/data/transform.py`` (BYOL views plus six
96-px local crops). Every default below is the official value for the working 400-epoch command
(``main_pretrain.py`` with the flags of the README's 400-epoch run) unless noted.

One step: the student (ResNet → per-location MLP projector → multi-head self-attention over the H·W cells →
L2 normalisation) embeds 2 global and L local crops; the EMA teacher (ResNet → projector → L2 normalisation, no
attention) embeds the 2 global crops. For each teacher global view j, the other student global view and every
student local view are scored against it: cells whose centres, in original-image coordinates, lie closer than
``pos_ratio`` × the larger bin diagonal are positives; the 9 most similar non-positive key cells are hard
negatives; a hinge ranking loss pushes positives above negatives. 2·(1 + L) terms are averaged.

What the shared trainer must do for CLoVE (main_pretrain.py): ``optimizer_name = "lars"`` (train/lars.py; 1-D
parameters get neither weight decay nor LARS scaling), constant weight decay (2e-5), no gradient clipping, lr
linear warm-up from lr/100 over 5 epochs then cosine to lr/100, teacher momentum 0.99 → 1 cosine, SyncBatchNorm
in student and teacher when distributed (``sync_batchnorm = True``).

Reading the loss: logits are −2·cos, so loss = 100 − 4·cos(positives) + 2·cos(hard negatives) while the hinge is
active (always, with margin 100). A collapsed model (every embedding equal) sits at exactly 98; random
embeddings near 100; the floor is 94.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from densessl.data.views import ColorAugmentation, CropSpec, MultiCropViews
from densessl.errors import ConfigError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.methods.clove_config import CLoVEConfig
from densessl.models.resnet import create_resnet, feature_grid, resnet_info


# ------------------------------------------------------------------------------------------------ geometry
def oriented_boxes(boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Boxes (..., 4) = (x1, y1, x2, y2) with x1 and x2 swapped where the crop was flipped horizontally.

    ``RandomHorizontalFlipCoord`` (contrast/data/transform_coord.py) stores flipped crops this way, so the
    bin width comes out negative and cell j of the flipped map lands at x1 + (j + 0.5)·bw from the right edge.
    """
    out = boxes.clone()
    flips = flips.bool()
    out[..., 0] = torch.where(flips, boxes[..., 2], boxes[..., 0])
    out[..., 2] = torch.where(flips, boxes[..., 0], boxes[..., 2])
    return out


def _cell_centres(box: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres (N, h·w) in x and y, row-major like a flattened (h, w) map, and each box's bin diagonal (N, 1)."""
    bin_w = (box[:, 2] - box[:, 0]) / w
    bin_h = (box[:, 3] - box[:, 1]) / h
    cols = torch.arange(w, dtype=box.dtype, device=box.device) + 0.5
    rows = torch.arange(h, dtype=box.dtype, device=box.device) + 0.5
    cx = box[:, 0, None, None] + cols.view(1, 1, w) * bin_w.view(-1, 1, 1)   # (N, 1, w)
    cy = box[:, 1, None, None] + rows.view(1, h, 1) * bin_h.view(-1, 1, 1)   # (N, h, 1)
    cx = cx.expand(-1, h, w).reshape(len(box), h * w)
    cy = cy.expand(-1, h, w).reshape(len(box), h * w)
    return cx, cy, torch.sqrt(bin_w ** 2 + bin_h ** 2).view(-1, 1)


def positive_mask(box_q: torch.Tensor, box_k: torch.Tensor, size_q: tuple[int, int], size_k: tuple[int, int],
                  pos_ratio: float) -> torch.Tensor:
    """(N, Hq·Wq, Hk·Wk) bool: query cell i and key cell j are positives when the distance between their
    centres in original-image coordinates is < ``pos_ratio`` × max(bin diagonal of q, of k).

    PixPro/CLoVE ``regression_loss`` geometry (contrast/loss.py); boxes are oriented (:func:`oriented_boxes`).
    """
    qx, qy, q_diag = _cell_centres(box_q.float(), *size_q)
    kx, ky, k_diag = _cell_centres(box_k.float(), *size_k)
    dist = torch.sqrt((qx[:, :, None] - kx[:, None, :]) ** 2 + (qy[:, :, None] - ky[:, None, :]) ** 2)
    dist = dist / torch.maximum(q_diag, k_diag)[:, :, None]
    return dist < pos_ratio


# ------------------------------------------------------------------------------------------------ loss
def ranking_loss(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, gamma: float, margin: float,
                 topk: int, skip: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``TripletLoss.regression_loss`` (contrast/loss.py) for one (query view, key view) pair.

    q: (N, C, Hq, Wq) and k: (N, C, Hk, Wk), L2-normalised over C; pos: (N, Hq·Wq, Hk·Wk) bool.
    logits = −2·qᵀk; per image, positives = mean of the logits over all positive pairs (0 if none);
    negatives = per query cell the ``topk`` smallest non-positive logits with the ``skip`` smallest dropped,
    averaged over those and over the query cells; loss = mean over images of
    max(0, γ·positives − negatives + margin) (``MarginRankingLoss(negatives, γ·positives, y=1)``).
    """
    n, c = q.shape[:2]
    qf = q.reshape(n, c, -1)
    kf = k.reshape(n, c, -1)
    if kf.shape[-1] < topk:
        raise ConfigError(f"CLoVE: the key map has {kf.shape[-1]} cells but negatives_topk={topk}; use larger "
                          f"global crops (global_size) or a smaller negatives_topk")
    logits = -2.0 * torch.bmm(qf.transpose(1, 2), kf)               # (N, Lq, Lk)
    posf = pos.to(logits.dtype)
    positives = (logits * posf).sum((1, 2)) / (posf.sum((1, 2)) + 1e-6)
    masked = logits.masked_fill(pos, float("inf"))
    negatives = torch.topk(masked, topk, dim=-1, largest=False).values[:, :, skip:].mean((1, 2))
    loss = torch.clamp(gamma * positives - negatives + margin, min=0).mean()
    return loss, {"pos_logit": positives.detach().mean(), "neg_logit": negatives.detach().mean(),
                  "pos_per_query": posf.detach().sum(-1).mean()}


class CLoVELoss(nn.Module):
    """``TripletLoss.forward``: for each teacher global view j, the other student global view and every
    student local view against j; the mean of the 2·(1 + L) pair losses."""

    def __init__(self, pos_ratio: float, gamma: float, margin: float, topk: int, skip: int):
        super().__init__()
        self.pos_ratio, self.gamma, self.margin, self.topk, self.skip = pos_ratio, gamma, margin, topk, skip

    def forward(self, student_globals: list[torch.Tensor], student_locals: list[torch.Tensor],
                teacher_globals: list[torch.Tensor], boxes: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """boxes: (N, 2 + L, 4) oriented boxes in view order (2 globals, then locals)."""
        total = student_globals[0].new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        terms = 0
        for j, key in enumerate(teacher_globals):
            queries = [(i, student_globals[i]) for i in range(len(student_globals)) if i != j]
            queries += [(len(student_globals) + i, m) for i, m in enumerate(student_locals)]
            for view, query in queries:
                mask = positive_mask(boxes[:, view], boxes[:, j], tuple(query.shape[-2:]), tuple(key.shape[-2:]),
                                     self.pos_ratio)
                loss, pair_stats = ranking_loss(query.float(), key.float(), mask, self.gamma, self.margin,
                                                self.topk, self.skip)
                total = total + loss
                for name, value in pair_stats.items():
                    sums[name] = sums.get(name, 0.0) + value
                terms += 1
        stats = {name: float(value) / terms for name, value in sums.items()}  # one device sync per statistic
        # −logit/2 is the cosine: report the similarity of positive pairs and of the hard negatives
        return total / terms, {"pos_cos": -stats["pos_logit"] / 2, "hard_neg_cos": -stats["neg_logit"] / 2,
                               "pos_per_query": stats["pos_per_query"], "pair_terms": float(terms)}


# ------------------------------------------------------------------------------------------------ modules
class Projector2d(nn.Module):
    """``MLP2d`` (contrast/models/CLoVE.py): conv1×1 (no bias) – BN – ReLU – conv1×1 (no bias) – BN(affine=False),
    applied at every location. Names ``linear1, bn1, linear2, bn2`` match the official checkpoint keys."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Conv2d(in_dim, hidden_dim, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv2d(hidden_dim, out_dim, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.linear2(self.relu1(self.bn1(self.linear1(x)))))


class CLoVEStudent(nn.Module):
    """Online branch: encoder → projector → self-attention over the H·W cells → L2 over channels.

    One ``forward`` takes the global and the local crops (one call per step keeps DDP's reducer simple);
    as in ``CLoVE.forward`` the two resolutions pass the encoder and projector as separate batches.
    """

    def __init__(self, encoder: nn.Module, projector: Projector2d, dim: int, heads: int, normalize_input: bool):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)  # CLoVE.py: MHA(256, 8)
        self.normalize_input = normalize_input

    def contextualize(self, x: torch.Tensor) -> torch.Tensor:
        """``CLoVE.featprop`` then ``normalize(dim=1)``: (N, C, H, W) → (N, C, H, W), unit norm per cell."""
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)                       # (N, H·W, C)
        if self.normalize_input:
            tokens = F.normalize(tokens, dim=-1)
        # need_weights=False: the weights are only logged as images by the official code
        out, _ = self.self_attn(tokens, tokens, tokens, need_weights=False)
        return F.normalize(out.transpose(1, 2).reshape(n, c, h, w), dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.contextualize(self.projector(feature_grid(self.encoder, images)))

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        local = self.embed(local_crops) if local_crops is not None else None
        return self.embed(global_crops), local


class CLoVETeacher(nn.Module):
    """Momentum branch: encoder → projector → L2 over channels (no attention, ``CLoVE.forward`` keys)."""

    def __init__(self, encoder: nn.Module, projector: Projector2d):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(feature_grid(self.encoder, images)), dim=1)


# ------------------------------------------------------------------------------------------------ method
@register
class CLoVE(PretrainMethod):
    name = "clove"
    config_cls = CLoVEConfig
    optimizer_name: ClassVar[str] = "lars"   # main_pretrain.py --optimizer lars (contrast/lars.py)
    sync_batchnorm: ClassVar[bool] = True    # main_pretrain.py build_model: convert_sync_batchnorm(model)

    def __init__(self, arch: str, config: dict[str, Any] | CLoVEConfig | None, epochs: int):
        super().__init__()
        cfg = config if isinstance(config, CLoVEConfig) else build_dataclass(CLoVEConfig, config,
                                                                             "method config (clove)")
        cfg.validate()
        self.cfg = cfg
        self.arch = arch
        self.arch_kwargs: dict[str, Any] = {}  # exported backbone: the plain architecture (init is irrelevant)
        encoder = create_resnet(arch, zero_init_residual=cfg.zero_init_residual)
        encoder.fc.requires_grad_(False)  # the classifier is never used; frozen so DDP sees no unused params
        dim = resnet_info(encoder).feature_dim
        self.student = CLoVEStudent(encoder, Projector2d(dim, cfg.projector_hidden_dim, cfg.projector_out_dim),
                                    cfg.projector_out_dim, cfg.attn_heads, cfg.normalize_attention_input)
        # CLoVE.__init__: encoder_k / projector_k start as copies of the online weights, never get gradients
        self.teacher = CLoVETeacher(copy.deepcopy(self.student.encoder), copy.deepcopy(self.student.projector))
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.criterion = CLoVELoss(cfg.pos_ratio, cfg.gamma, cfg.margin, cfg.negatives_topk, cfg.negatives_skip)

    def _student(self) -> CLoVEStudent:
        s = self.student
        return s.module if isinstance(s, nn.parallel.DistributedDataParallel) else s  # type: ignore[return-value]

    def views(self) -> MultiCropViews:
        """BYOL asymmetric globals + blurred locals (contrast/data/transform.py ``get_transform('BYOL')``).

        Boxes follow the official ``RandomResizedCropCoord`` (contrast/data/transform_coord.py): pixel
        indices over (size − 1), i.e. ``box_convention="pixel_index"`` (data/views.py).
        """
        c = self.cfg
        crops = [
            CropSpec(c.global_size, c.global_crops_scale, 1, blur_prob=c.global_blur_prob[0],
                     solarize_prob=c.global_solarize_prob[0]),
            CropSpec(c.global_size, c.global_crops_scale, 1, blur_prob=c.global_blur_prob[1],
                     solarize_prob=c.global_solarize_prob[1]),
        ]
        if c.local_crops_number > 0:
            crops.append(CropSpec(c.local_size, c.local_crops_scale, c.local_crops_number,
                                  blur_prob=c.local_blur_prob))
        color = ColorAugmentation(jitter=c.color_jitter, jitter_prob=c.color_jitter_prob,
                                  grayscale_prob=c.grayscale_prob, blur_radius=c.blur_radius)
        return MultiCropViews(crops, color, box_convention="pixel_index")

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        crops: list[torch.Tensor] = batch["crops"]
        n_local = len(crops) - 2
        if n_local != self.cfg.local_crops_number:
            raise ConfigError(f"CLoVE: batch has {len(crops)} crops, config expects 2 + local_crops_number="
                              f"{self.cfg.local_crops_number}; build the views with this method's views()")
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if n_local else None
        student_global, student_local = self.student(global_crops, local_crops)
        with torch.no_grad():
            teacher_global = self.teacher(global_crops)
        boxes = oriented_boxes(batch["boxes"], batch["flips"])
        # The official loss runs in fp32 outside autocast (main_pretrain.py: triplet_loss(x.float(), ...)).
        with torch.autocast(global_crops.device.type, enabled=False):
            return self.criterion(list(student_global.float().chunk(2)),
                                  list(student_local.float().chunk(n_local)) if student_local is not None else [],
                                  list(teacher_global.float().chunk(2)), boxes)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_k ← m θ_k + (1 − m) θ_q over encoder and projector parameters (``_update_momentum_encoder``);
        buffers (BN running statistics) are the teacher's own, as in the official code. The official code
        updates at the start of the next forward with that step's m; the shared trainer updates right after
        the optimiser step with the current step's m (the same sequence shifted by one iteration)."""
        s = self._student()
        online = itertools.chain(s.encoder.parameters(), s.projector.parameters())
        target = itertools.chain(self.teacher.encoder.parameters(), self.teacher.projector.parameters())
        for ps, pt in zip(online, target, strict=True):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)

    def export_backbone(self) -> nn.Module:
        source = self._student().encoder if self.cfg.export_weights == "student" else self.teacher.encoder
        backbone = copy.deepcopy(source)
        backbone.requires_grad_(True)
        return backbone
