"""DINO's settings (``pretrain.dino.method``); each field cites its official source.

The method (:mod:`densessl.methods.dino`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DINOConfig:
    out_dim: int = 65536                  # --out_dim
    hidden_dim: int = 2048                # DINOHead hidden_dim
    bottleneck_dim: int = 256             # DINOHead bottleneck_dim
    use_bn_in_head: bool = False          # --use_bn_in_head
    norm_last_layer: bool = True          # --norm_last_layer (its help: authors used False for vit_small)
    warmup_teacher_temp: float = 0.04     # --warmup_teacher_temp
    teacher_temp: float = 0.04            # --teacher_temp
    warmup_teacher_temp_epochs: int = 0   # --warmup_teacher_temp_epochs (help text wrongly says 30)
    student_temp: float = 0.1             # DINOLoss, hard-coded
    center_momentum: float = 0.9          # DINOLoss, hard-coded
    drop_path_rate: float = 0.1           # --drop_path_rate (student only)
    freeze_last_layer: int = 1            # --freeze_last_layer (epochs)
    global_size: int = 224                # DataAugmentationDINO RandomResizedCrop(224)
    local_size: int = 96                  # DataAugmentationDINO RandomResizedCrop(96)
    global_crops_scale: tuple[float, float] = (0.4, 1.0)   # --global_crops_scale
    local_crops_scale: tuple[float, float] = (0.05, 0.4)   # --local_crops_scale
    local_crops_number: int = 8           # --local_crops_number
    blur_radius: tuple[float, float] = (0.1, 2.0)          # utils.GaussianBlur radius_min/max
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # ColorJitter(0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8        # RandomApply(ColorJitter, p=0.8)
    grayscale_prob: float = 0.2           # RandomGrayscale(p=0.2)
    # Which weights are exported for evaluation. The paper and the official releases evaluate the teacher
    # (facebookresearch/dino#44; arXiv 2104.14294 reports teacher results). In short smoke runs the student
    # can score ahead of the EMA teacher, which "student" exports.
    export_weights: str = "teacher"       # teacher | student
