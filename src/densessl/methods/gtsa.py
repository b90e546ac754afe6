"""GTSA: geometric-transformation-sensitive teacher/student alignment (Kim & Lee, arXiv 2304.08014).

Follows the official code bok3948/GTSA @ c0dfe2b (``model_pretrain/gtsa.py``, ``engine_pretrain.py``,
``util/gtsa_transforms.py``; paper arXiv 2304.08014). The released objective is BYOL-style and dense — no
DINO head, centring or prototypes:

* student = ViT → conv projector → conv predictor; teacher = EMA of ViT and projector (global crops only);
* **crop loss**: RoIAlign the teacher map (of global view iq) and the student map (of view v ≠ iq) on the region
  both views saw, turn the pooled teacher map into the student's frame (undo the teacher's rotation and flip,
  apply the student's), negative cosine per location;
* **patch-correspondence loss**: each token's nearest neighbour (cosine) in the other view's map; the
  ``num_matches`` most similar tokens are pulled together, both directions;
* **rotation prediction**: 4-way cross-entropy from the mean student backbone patch token of every view.

Total (``engine_pretrain.py``) = crop + pc_coef·pc + 0.5·rot, pc_coef = 0.5 only for epoch > 10.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from densessl.errors import ConfigError, DataError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.methods.gtsa_config import GTSAConfig
from densessl.methods.gtsa_views import ALLOWED_ANGLES, GTSAViews, pair_boxes, quarter_turns
from densessl.models.backbones import backbone_info, create_backbone, patch_tokens


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, no affine (official ``TransposeLast`` + LayerNorm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3×3 → channel LayerNorm → GELU (official ``Projector.make_block`` / ``Predictor.make_block``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), ChannelLayerNorm(out_channels),
                         nn.GELU())


def _init_conv(m: nn.Module) -> None:
    """Official ``Projector._init_weights``: conv weights N(0, 0.02), zero bias."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        nn.init.zeros_(m.bias)


class ConvHead(nn.Module):
    """Projector (residual=True) or predictor (residual=False): ``layers`` conv blocks, then Conv1×1.

    The projector adds a residual around every block whose input and output widths match (official
    ``Projector.add_residual``); the predictor's residual is commented out in the official code.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.blocks = nn.ModuleList(_conv_block(in_dim if i == 0 else hidden_dim, hidden_dim) for i in range(layers))
        self.proj = nn.Conv2d(hidden_dim, out_dim, kernel_size=1)
        self.apply(_init_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            y = block(x)
            x = y + x if self.residual and y.shape[1] == x.shape[1] else y
        return self.proj(x)


def rotation_head(embed_dim: int, hidden_dim: int, bottleneck_dim: int, classes: int = 4) -> nn.Sequential:
    """Official ``GTSA.rot_predictor`` (PyTorch default init, as there)."""
    return nn.Sequential(
        nn.Linear(embed_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim), nn.LayerNorm(bottleneck_dim),
        nn.Linear(bottleneck_dim, classes))


def _resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(start, end) of consecutive crops of equal size: each group is one backbone pass (MultiCropWrapper)."""
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class GTSAStudent(nn.Module):
    """Backbone → projector → predictor per view, plus rotation logits from the mean backbone patch token."""

    def __init__(self, backbone: nn.Module, projector: ConvHead, predictor: ConvHead, rot_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.rot_head = rot_head

    def forward(self, crops: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        maps: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for start, end in _resolution_groups(crops):
            tokens = patch_tokens(self.backbone, torch.cat(crops[start:end]))  # (n·B, D, h, w)
            out = self.predictor(self.projector(tokens))
            rot = self.rot_head(tokens.mean(dim=(2, 3)))  # official rot_predict: mean of the patch tokens
            maps.extend(out.chunk(end - start))
            logits.extend(rot.chunk(end - start))
        return maps, logits


class GTSATeacher(nn.Module):
    """EMA backbone → EMA projector (official ``momentum_MultiCropWrapper``)."""

    def __init__(self, backbone: nn.Module, projector: ConvHead):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = []
        for start, end in _resolution_groups(crops):
            maps.extend(self.projector(patch_tokens(self.backbone, torch.cat(crops[start:end]))).chunk(end - start))
        return maps


# ------------------------------------------------------------------------------------------------- geometry
def rotate_maps(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each sample of a square (B, C, S, S) map by ``turns[b]`` counter-clockwise quarter turns.

    The official code uses ``kornia.geometry.transform.rotate`` (positive = counter-clockwise, bilinear); for
    multiples of 90° on a square grid that is this exact permutation.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_maps needs square maps, got {tuple(x.shape)}")
    candidates = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
    return candidates[turns.long() % 4, torch.arange(x.shape[0], device=x.device)]


def teacher_to_student_frame(x: torch.Tensor, teacher_turns: torch.Tensor, teacher_flip: torch.Tensor,
                             student_turns: torch.Tensor, student_flip: torch.Tensor) -> torch.Tensor:
    """Re-express a map sampled in the teacher crop's frame in the student crop's frame.

    A view is flip-then-rotate of the source, so the map goes teacher → source (undo rotation, undo flip) →
    student (flip, rotate). Without flips this is the official rotation by (angle_v − angle_iq).
    """
    x = rotate_maps(x, -teacher_turns)
    x = torch.where((teacher_flip ^ student_flip).view(-1, 1, 1, 1), x.flip(-1), x)
    return rotate_maps(x, student_turns)


def roi_pool(maps: torch.Tensor, boxes: torch.Tensor, output_size: int, patch_size: int) -> torch.Tensor:
    """RoIAlign one box per sample; boxes (B, 4) in crop pixels (official: boxes / patch_size, aligned=True)."""
    index = torch.arange(maps.shape[0], device=maps.device, dtype=boxes.dtype).unsqueeze(1)
    rois = torch.cat((index, boxes), dim=1).to(maps.dtype)
    return roi_align(maps, rois, output_size=output_size, spatial_scale=1.0 / patch_size, sampling_ratio=-1,
                     aligned=True)


# ------------------------------------------------------------------------------------------------- losses
def negative_cosine_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """−cos over channels at each location of two (B, C, H, W) maps (official ``GTSA.cosine_loss``, 4-d)."""
    return -(F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)


def matched_negative_cosine(inputs: torch.Tensor, candidates: torch.Tensor, num_matches: int) -> torch.Tensor:
    """Mean −cos between the ``num_matches`` inputs closest to their nearest candidate and that candidate.

    inputs (B, N, C), candidates (B, M, C). Official ``neirest_neighbores_on_l2`` + ``neirest_neighbores``:
    distance = −cosine, nearest candidate per input, keep the inputs with the smallest distance. The selection
    carries no gradient; the loss is recomputed on the selected raw features (``nn.CosineSimilarity``).
    """
    with torch.no_grad():
        sim = F.normalize(inputs, dim=-1) @ F.normalize(candidates, dim=-1).transpose(1, 2)
        best, nearest = sim.max(dim=-1)                       # (B, N)
        keep = best.topk(num_matches, dim=1).indices          # (B, k)
        partner = nearest.gather(1, keep)                     # (B, k)
    channels = inputs.shape[-1]
    chosen = inputs.gather(1, keep.unsqueeze(-1).expand(-1, -1, channels))
    matched = candidates.gather(1, partner.unsqueeze(-1).expand(-1, -1, channels))
    return -F.cosine_similarity(chosen, matched, dim=-1).mean()


def patch_correspondence_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, num_matches: int
                              ) -> torch.Tensor:
    """0.5 · (student→teacher + teacher→student) matched −cos (official ``GTSA.roi_align``, 'matching')."""
    s = student_map.flatten(2).transpose(1, 2)
    t = teacher_map.flatten(2).transpose(1, 2)
    if num_matches > min(s.shape[1], t.shape[1]):
        raise ConfigError(f"pretrain.gtsa.method.num_matches: {num_matches} matches requested but the maps have "
                          f"{s.shape[1]} (student) and {t.shape[1]} (teacher) tokens; official: half the student "
                          f"view's tokens (98 of 196, 18 of 36)")
    return 0.5 * (matched_negative_cosine(s, t, num_matches) + matched_negative_cosine(t, s, num_matches))


def rotation_loss(logits: list[torch.Tensor], turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over views of the 4-way CE (official ``GTSA.rot_predict``) and the accuracy, for the log."""
    losses = [F.cross_entropy(lg.float(), turns[:, v]) for v, lg in enumerate(logits)]
    with torch.no_grad():
        correct = torch.stack([(lg.argmax(-1) == turns[:, v]).float().mean() for v, lg in enumerate(logits)])
    return torch.stack(losses).mean(), correct.mean()


@dataclass
class PairGeometry:
    """Everything the crop loss needs to know about one batch's views."""

    in_global: torch.Tensor   # (B, G, N, 4) overlap in the teacher (global) crop's pixels
    in_view: torch.Tensor     # (B, G, N, 4) overlap in the student crop's pixels
    turns: torch.Tensor       # (B, N) counter-clockwise quarter turns
    flips: torch.Tensor       # (B, N) bool


def crop_and_pc_losses(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], geom: PairGeometry,
                       num_global: int, roi_out_size: tuple[int, int], num_matches: tuple[int, int],
                       patch_size: int, with_pc_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Average crop loss and pc loss over the pairs (teacher global iq, student view v ≠ iq).

    Official ``GTSA.roi_align``. The official code picks the RoI size and match count by the student map size
    (> 100 cells = global); here by the view's kind, which agrees at 224/96 px with patch 16 and stays right for
    small smoke crops.
    """
    crop_total: torch.Tensor = student_maps[0].new_zeros((), dtype=torch.float32)
    pc_total = crop_total.clone()
    pairs = 0
    for iq, teacher in enumerate(teacher_maps):
        teacher = teacher.detach().float()
        for v, student in enumerate(student_maps):
            if v == iq:
                continue
            kind = 0 if v < num_global else 1
            student = student.float()
            pooled_teacher = roi_pool(teacher, geom.in_global[:, iq, v], roi_out_size[kind], patch_size)
            pooled_student = roi_pool(student, geom.in_view[:, iq, v], roi_out_size[kind], patch_size)
            pooled_teacher = teacher_to_student_frame(pooled_teacher, geom.turns[:, iq], geom.flips[:, iq],
                                                      geom.turns[:, v], geom.flips[:, v])
            crop_total = crop_total + negative_cosine_map(pooled_student, pooled_teacher).mean()
            with torch.set_grad_enabled(with_pc_grad and torch.is_grad_enabled()):
                pc_total = pc_total + patch_correspondence_loss(student, teacher, num_matches[kind])
            pairs += 1
    if pairs == 0:
        raise ConfigError("pretrain.gtsa.method: no (global, other view) pairs; use global_crops_number ≥ 2 or "
                          "local_crops_number ≥ 1")
    return crop_total / pairs, pc_total / pairs


# ------------------------------------------------------------------------------------------------- method
@register
class GTSA(PretrainMethod):
    name = "gtsa"
    config_cls = GTSAConfig

    def __init__(self, arch: str, config: dict[str, Any] | GTSAConfig | None, epochs: int):
        super().__init__()
        cfg = config if isinstance(config, GTSAConfig) else build_dataclass(GTSAConfig, config, "method config (gtsa)")
        _validate(cfg)
        self.cfg = cfg
        self.arch = arch
        self.arch_kwargs = {}  # exported backbone: plain architecture, no drop path
        student_backbone = create_backbone(arch, drop_path_rate=cfg.drop_path_rate)
        teacher_backbone = create_backbone(arch)  # official momentum_encoder: drop_path_rate=0
        info = backbone_info(student_backbone)
        self.patch_size = info.patch_size
        for size, field in ((cfg.global_size, "global_size"), (cfg.local_size, "local_size")):
            if size % info.patch_size:
                raise ConfigError(f"pretrain.gtsa.method.{field}={size} is not a multiple of {arch}'s patch size "
                                  f"{info.patch_size}")

        def projector() -> ConvHead:
            return ConvHead(info.embed_dim, cfg.projector_dim, cfg.out_dim, cfg.projector_layers, residual=True)

        self.student = GTSAStudent(
            student_backbone, projector(),
            ConvHead(cfg.out_dim, cfg.predictor_dim, cfg.out_dim, cfg.predictor_layers, residual=False),
            rotation_head(info.embed_dim, cfg.rot_hidden_dim, cfg.rot_bottleneck_dim))
        self.teacher = GTSATeacher(teacher_backbone, projector())
        # official GTSA.__init__: momentum encoder/projector start as copies of the base ones, no gradients
        self.teacher.backbone.load_state_dict(self.student.backbone.state_dict())
        self.teacher.projector.load_state_dict(self.student.projector.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False

    def _student(self) -> GTSAStudent:
        s = self.student
        return s.module if isinstance(s, nn.parallel.DistributedDataParallel) else s  # type: ignore[return-value]

    def views(self) -> GTSAViews:
        c = self.cfg
        return GTSAViews(
            global_size=c.global_size, local_size=c.local_size, global_count=c.global_crops_number,
            local_count=c.local_crops_number, global_scale=c.global_crops_scale, local_scale=c.local_crops_scale,
            min_intersection=c.min_intersection, global_intersection_factor=c.global_intersection_factor,
            angles=c.rotation_angles, flip_prob=c.flip_prob, jitter=c.color_jitter, jitter_prob=c.color_jitter_prob,
            grayscale_prob=c.grayscale_prob, blur_prob=c.blur_prob, blur_radius=c.blur_radius,
            max_attempts=c.max_crop_attempts)

    def pc_coef(self, epoch: int) -> float:
        """engine_pretrain.py: ``pc_loss_coef if args.warmup_epochs < epoch else 0.0``."""
        return self.cfg.pc_loss_coef if epoch > self.cfg.pc_warmup_epochs else 0.0

    def geometry(self, batch: dict[str, Any]) -> PairGeometry:
        missing = [k for k in ("crops", "boxes", "flips", "angles") if k not in batch]
        if missing:
            raise DataError(f"GTSA batch lacks {missing}; build the loader with GTSA.views() (GTSAViews), which "
                            f"records each crop's box, flip and angle")
        c = self.cfg
        num_crops = c.global_crops_number + c.local_crops_number
        if len(batch["crops"]) != num_crops:
            raise DataError(f"GTSA batch has {len(batch['crops'])} crops; the config asks for "
                            f"{c.global_crops_number} global + {c.local_crops_number} local")
        sizes = [crop.shape[-1] for crop in batch["crops"]]
        in_global, in_view = pair_boxes(batch["boxes"].float(), batch["flips"].bool(), batch["angles"], sizes,
                                        c.global_crops_number)
        if bool(((in_view[..., 2:] - in_view[..., :2]) <= 0).any()):
            raise DataError("GTSA batch: a view does not overlap a global crop; GTSAViews guarantees an overlap of "
                            "more than min_intersection, so the boxes did not come from it")
        return PairGeometry(in_global, in_view, quarter_turns(batch["angles"]), batch["flips"].bool())

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.cfg
        geom = self.geometry(batch)
        crops = batch["crops"]
        student_maps, rot_logits = self.student(crops)
        with torch.no_grad():
            teacher_maps = self.teacher(crops[:c.global_crops_number])
        pc_coef = self.pc_coef(epoch)
        crop, pc = crop_and_pc_losses(student_maps, teacher_maps, geom, c.global_crops_number, c.roi_out_size,
                                      c.num_matches, self.patch_size, with_pc_grad=pc_coef > 0)
        rot, rot_acc = rotation_loss(rot_logits, geom.turns)
        total = crop + pc_coef * pc + c.rot_pre_coef * rot
        with torch.no_grad():  # collapse diagnostic: spread of the normalised teacher vectors (0 = collapsed)
            t = F.normalize(teacher_maps[0].float(), dim=1).flatten(2).transpose(1, 2).reshape(-1, c.out_dim)
            teacher_std = t.std(dim=0).mean()
        # 0-dim tensors: the trainer reads logs back only at log steps (no host sync per step)
        return total, {"crop_loss": crop.detach(), "pc_loss": pc.detach(), "rot_loss": rot.detach(), "rot_acc": rot_acc,
                       "pc_coef": pc_coef, "teacher_std": teacher_std}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of backbone and projector only (official ``_update_momentum_encoder``).

        The official code updates inside ``forward`` before the teacher pass; the shared trainer updates after
        ``optimizer.step()``, which is the same sequence of teachers shifted by one schedule index.
        """
        student = dict(self._student().named_parameters())
        for name, pt in self.teacher.named_parameters():
            pt.mul_(momentum).add_(student[name].detach(), alpha=1 - momentum)

    def export_backbone(self) -> nn.Module:
        source = self.teacher if self.cfg.export_weights == "teacher" else self._student()
        return copy.deepcopy(source.backbone)


def _validate(cfg: GTSAConfig) -> None:
    where = "pretrain.gtsa.method"
    if cfg.export_weights not in ("student", "teacher"):
        raise ConfigError(f"{where}.export_weights: {cfg.export_weights!r}; allowed values: student, teacher")
    if cfg.global_crops_number < 1 or cfg.local_crops_number < 0:
        raise ConfigError(f"{where}: global_crops_number must be ≥ 1 and local_crops_number ≥ 0 "
                          f"(got {cfg.global_crops_number}, {cfg.local_crops_number})")
    if cfg.global_crops_number + cfg.local_crops_number < 2:
        raise ConfigError(f"{where}: at least two crops are needed for a (teacher, student) pair")
    for field in ("roi_out_size", "num_matches"):
        value = getattr(cfg, field)
        if len(value) != 2 or any(int(x) < 1 for x in value):
            raise ConfigError(f"{where}.{field}: {list(value)}; give two positive integers (global, local)")
    if not 0.0 <= cfg.flip_prob <= 1.0:
        raise ConfigError(f"{where}.flip_prob={cfg.flip_prob} must lie in [0, 1]")
    bad = [a for a in cfg.rotation_angles if a not in ALLOWED_ANGLES]
    if bad or not cfg.rotation_angles:
        raise ConfigError(f"{where}.rotation_angles: {list(cfg.rotation_angles)}; use a non-empty subset of "
                          f"{list(ALLOWED_ANGLES)}")
