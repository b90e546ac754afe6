"""DINO: self-distillation with no labels (Caron et al., arXiv 2104.14294).

Follows the official code facebookresearch/dino @ 7c446df (`main_dino.py`, `vision_transformer.py`); every
default below is the `main_dino.py` argparse default unless noted.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from densessl.data.views import ColorAugmentation, CropSpec, MultiCropViews
from densessl.errors import ConfigError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.methods.dino_config import DINOConfig
from densessl.models.backbones import create_backbone
from densessl.train.schedules import teacher_temperature_schedule


class DINOHead(nn.Module):
    """MLP → L2-normalise → weight-normalised linear (vision_transformer.py ``DINOHead``)."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool, norm_last_layer: bool, hidden_dim: int,
                 bottleneck_dim: int, nlayers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        for _ in range(nlayers - 2):
            layers.append(nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # weight_g filled with 1; frozen when norm_last_layer (official DINOHead.__init__)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Run the backbone once per group of equal-resolution crops, then the head once (utils.MultiCropWrapper)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        boundaries = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        outputs, start = [], 0
        for end in boundaries:
            features = self.backbone.forward_features(torch.cat(crops[start:end]))
            outputs.append(self.backbone.forward_head(features, pre_logits=True))  # final-norm CLS token
            start = end
        return self.head(torch.cat(outputs))


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher and student distributions (main_dino.py DINOLoss)."""

    def __init__(self, out_dim: int, num_crops: int, teacher_temps: Any, student_temp: float,
                 center_momentum: float):
        super().__init__()
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temps = teacher_temps
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        student = (student_out / self.student_temp).chunk(self.num_crops)
        temp = float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])
        teacher_probs = F.softmax((teacher_out - self.center) / temp, dim=-1).detach()
        teacher = teacher_probs.chunk(2)
        total, pairs = student_out.new_zeros(()), 0
        for iq, q in enumerate(teacher):
            for v in range(self.num_crops):
                if v == iq:  # skip the same view
                    continue
                total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
                pairs += 1
        loss = total / pairs
        # Collapse diagnostics (facebookresearch/dino#246 logs the uniform plateau ln(65536) ≈ 11.09):
        # per-sample teacher entropy near ln(out_dim) = uniform collapse;
        # entropy of the batch-mean distribution near 0 = every image on one prototype.
        with torch.no_grad():
            # 0-dim tensors: the trainer reads logs back only at log steps (no host sync per step)
            entropy = -(teacher_probs * torch.log(teacher_probs + 1e-12)).sum(-1).mean()
            marginal = teacher_probs.mean(0)
            batch_entropy = -(marginal * torch.log(marginal + 1e-12)).sum()
        self.update_center(teacher_out)
        return loss, {"teacher_temp": temp, "teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy}

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_out)), device=teacher_out.device)
        # The official code always all-reduces (utils.py, so it needs NCCL even on one GPU); skip it alone.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


@register
class DINO(PretrainMethod):
    name = "dino"
    config_cls = DINOConfig

    def __init__(self, arch: str, config: dict[str, Any] | DINOConfig | None, epochs: int):
        super().__init__()
        cfg = config if isinstance(config, DINOConfig) else build_dataclass(DINOConfig, config, "method config (dino)")
        self.cfg = cfg
        self.arch = arch
        self.arch_kwargs = {}  # exported backbone: plain architecture, no drop path
        student_backbone = create_backbone(arch, drop_path_rate=cfg.drop_path_rate)
        teacher_backbone = create_backbone(arch)
        embed_dim = student_backbone.embed_dim
        head_args = dict(out_dim=cfg.out_dim, use_bn=cfg.use_bn_in_head, hidden_dim=cfg.hidden_dim,
                         bottleneck_dim=cfg.bottleneck_dim)
        self.student = MultiCropWrapper(student_backbone,
                                        DINOHead(embed_dim, norm_last_layer=cfg.norm_last_layer, **head_args))
        # teacher head is built with norm_last_layer=True, then overwritten by the student's weights
        self.teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, norm_last_layer=True, **head_args))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        num_crops = 2 + cfg.local_crops_number
        temps = teacher_temperature_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                             cfg.warmup_teacher_temp_epochs, epochs)
        self.criterion = DINOLoss(cfg.out_dim, num_crops, temps, cfg.student_temp, cfg.center_momentum)

    def views(self) -> MultiCropViews:
        c = self.cfg
        crops = [
            CropSpec(c.global_size, c.global_crops_scale, 1, blur_prob=1.0),
            CropSpec(c.global_size, c.global_crops_scale, 1, blur_prob=0.1, solarize_prob=0.2),
        ]
        if c.local_crops_number > 0:
            crops.append(CropSpec(c.local_size, c.local_crops_scale, c.local_crops_number, blur_prob=0.5))
        color = ColorAugmentation(jitter=c.color_jitter, jitter_prob=c.color_jitter_prob,
                                  grayscale_prob=c.grayscale_prob, blur_radius=c.blur_radius)
        return MultiCropViews(crops, color)

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        crops = batch["crops"]
        teacher_out = self.teacher(crops[:2])  # only the 2 global views pass through the teacher
        student_out = self.student(crops)
        return self.criterion(student_out, teacher_out, epoch)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)

    def cancel_gradients(self, epoch: int) -> None:
        if epoch >= self.cfg.freeze_last_layer:
            return
        for name, p in self.student.named_parameters():
            if "last_layer" in name:
                p.grad = None

    def export_backbone(self) -> nn.Module:
        if self.cfg.export_weights not in ("teacher", "student"):
            raise ConfigError(f"pretrain.dino.method.export_weights: {self.cfg.export_weights!r}; "
                              f"allowed values: teacher, student")
        source = self.teacher if self.cfg.export_weights == "teacher" else self.student
        return copy.deepcopy(source.backbone)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"center": self.criterion.center.detach().clone()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.criterion.center.copy_(state["center"])

