"""SelfPatch's settings (``pretrain.selfpatch.method``); each field cites its official source.

The method (:mod:`densessl.methods.selfpatch`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.methods.dino_config import DINOConfig


@dataclass
class SelfPatchConfig(DINOConfig):
    """DINO's fields with ``main_selfpatch.py`` defaults, plus the patch-level ones.

    Inherited fields whose SelfPatch default equals DINO's are not repeated: out_dim 65536 (--out_dim),
    norm_last_layer True (--norm_last_layer; the README command does not change it), use_bn_in_head False,
    teacher temperature 0.04 → 0.04 with 0 warm-up epochs, student_temp 0.1 and centre momentum 0.9
    (``DINOLoss`` defaults), drop_path_rate 0.1 (hard-coded for the student in ``train_dino``), freeze_last_layer 1,
    224/96 px crops with 8 local crops and DINO's photometric recipe (``DataAugmentationDINO``), export of the
    teacher (the released checkpoints and the converter ``segmentation/tools/model_converters/vit2mmseg.py``
    take ``ckpt['teacher']``).
    """

    global_crops_scale: tuple[float, float] = (0.25, 1.0)  # main_selfpatch.py --global_crops_scale
    local_crops_scale: tuple[float, float] = (0.05, 0.25)  # main_selfpatch.py --local_crops_scale
    out_dim_selfpatch: int = 4096          # main_selfpatch.py --out_dim_selfpatch (README command: 4096)
    k_num: int = 4                         # main_selfpatch.py --k_num (README command: 4)
    neighbourhood_size: int = 3            # SelfPatchHead.k_size = 3 (hard-coded): 3×3 window → 8 candidates
    num_ca_blocks: int = 2                 # SelfPatchHead: 2 LayerScale_Block_CA (hard-coded)
    ca_mlp_ratio: float = 4.0              # SelfPatchHead: mlp_ratio=4.0 (hard-coded)
    patch_loss_weight: float = 0.1         # DINOLoss.forward: c_loss + p_loss * 0.1 (hard-coded λ)
    # The official loss updates the image-level centre from the teacher outputs of all crops (DINO: the 2 global
    # crops). The paper does not discuss it; SelfPatch runs match the official code. False gives DINO's rule.
    center_from_all_crops: bool = True     # DINOLoss.forward: update_center(torch.cat(teacher_cls)) over all crops
