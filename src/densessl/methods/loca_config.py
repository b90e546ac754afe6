"""LOCA's settings (``pretrain.loca.method``); each field cites its official source.

The method (:mod:`densessl.methods.loca`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LOCAConfig:
    # --- heads (vit.py, configs/loca_imnet1k_base16.py) ---
    head_hidden_dim: int = 2048           # ViTLOCAModel: model.get('head_hidden_dim', 2048)
    head_bottleneck_dim: int = 256        # ViTLOCAModel: model.get('head_bottleneck_dim', 256)
    head_output_dim: int = 4096           # config.model.head_output_dim (code default 1024)
    drop_path_rate: float = 0.1           # config.model.stochastic_depth (linear 0 → 0.1 over blocks)
    # trainer.py runs the EMA teacher with train=True, so stochastic depth also drops teacher blocks.
    teacher_drop_path: bool = True
    # --- objective (trainer.py loca_train_step) ---
    apply_cluster_loss: bool = True       # config.apply_cluster_loss (False = v1: position prediction only)
    student_temperature: float = 0.1      # config.model.temperature
    teacher_temperature: float = 0.05     # config.sharpening
    sinkhorn_iterations: int = 3          # utils.sinkhorn num_itr default
    position_loss_weight: float = 1.0     # trainer.py: total = localization + feature (unweighted)
    cluster_loss_weight: float = 1.0      # trainer.py: unweighted
    me_max_weight: float = 1.0            # trainer.py: feature_loss += sum(p̄ log p̄), unweighted
    # --- token dropping (vit.py token_indexes_not_to_drop) ---
    reference_keep_fraction: float = 0.2  # config.reference_seqlen = int(0.2 * n_ref_positions) (80 % masked)
    reference_selection: str = "consecutive"  # config.reference_seqlen_selection
    query0_keep_tokens: int = 70          # config.query_max_seqlen (of 196); ≤ 0 keeps all
    query0_selection: str = "unstructured"    # ViT4LOCA.__call__ default seqlen_selection
    # The official indices are drawn once per device step and shared by its images (trainer.py).
    per_image_token_drop: bool = False
    # --- views (config pp_train string, ops.py) ---
    reference_size: int = 224             # reference_resolution
    reference_scale: tuple[float, float] = (0.32, 1.0)   # cropflip_generatemask(224, 32): area 32–100 %
    reference_flip: bool = False          # cropflip_generatemask(..., flip=False)
    query_size: int = 224                 # inception_crop_with_mask((224, 224), 32, 100, (14, 14))
    query_scale: tuple[float, float] = (0.32, 1.0)
    focal_size: int = 96                  # inception_crop_with_mask((96, 96), 5, 32, (6, 6))
    focal_scale: tuple[float, float] = (0.05, 0.32)
    num_focal_queries: int = 9            # dataset_configs.number_of_focal_queries = n_queries - 1
    flip_prob: float = 0.5                # flip_with_mask (tf stateless_random_flip_left_right)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # random_color_jitter(0.8, …)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2           # random_grayscale(0.2)
    # "code": random_blur(p) passes p as the kernel height → kernel size 1, no blur (ops.py, pp_train);
    # "intended": blur with blur_probs (reference, query0, focal) [unverified intent].
    blur: str = "code"
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # random_blur(1.0) / (0.1) / (0.5) arguments
    blur_sigma: tuple[float, float] = (0.1, 2.0)              # ops.random_blur: sigma ~ U(0.1, 2.0)
    solarize_prob: float = 0.2            # random_solarize(0.2), query0 only
    # "official": targets from ops.py's 14×14 id map carried through TF nearest resizes (loca_views.py);
    # "centres": the reference patch under each query patch's exact centre.
    position_targets: str = "official"
    # Released checkpoints hold `teacher_weights` (EMA; google-research/scenic#1104, #1106): the teacher is what
    # the paper evaluates.
    export_weights: str = "teacher"       # teacher | student
