"""GTSA's settings (``pretrain.gtsa.method``); each field cites its official source.

The method (:mod:`densessl.methods.gtsa`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# RandomRotationReturnsDegree(degrees=[0, 90, 180, 270]): the rotations the views draw from (gtsa_views.py)
ALLOWED_ANGLES = (0, 90, 180, 270)


@dataclass
class GTSAConfig:
    # --- views: util/gtsa_transforms.py GTSATransforms and the main_pretrain.py multi-crop flags
    global_size: int = 224                  # --size-crops [224, 96]
    local_size: int = 96                    # --size-crops [224, 96]
    global_crops_number: int = 2            # --num-crops [2, 8]
    local_crops_number: int = 8             # --num-crops [2, 8]
    global_crops_scale: tuple[float, float] = (0.3, 1.0)   # --min_scale_crops [0.3, 0.1], --max_scale_crops [1, .3]
    local_crops_scale: tuple[float, float] = (0.1, 0.3)    # --min_scale_crops, --max_scale_crops
    min_intersection: float = 0.01          # GTSATransforms(min_intersection=0.01): > 1 % of the image area
    global_intersection_factor: float = 2.0  # GTSATransforms.__call__: global crops need "min_intersection *= 2"
    rotation_angles: tuple[int, ...] = ALLOWED_ANGLES  # RandomRotationReturnsDegree(degrees=[0, 90, 180, 270])
    flip_prob: float = 0.0                  # GTSATransforms has no horizontal flip; ours, for ablations
    color_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), s=1
    color_jitter_prob: float = 0.8          # RandomApply([color_jitter], p=0.8)
    grayscale_prob: float = 0.2             # RandomGrayscale(p=0.2)
    blur_prob: float = 0.2                  # RandomApply([GaussianBlur], p=0.2)
    blur_radius: tuple[float, float] = (0.1, 2.0)  # GaussianBlur(sigma=[0.1, 2.0]) used as PIL radius
    max_crop_attempts: int = 1000           # ours: the official re-sampling loop has no bound
    # --- networks: model_pretrain/gtsa.py
    drop_path_rate: float = 0.1             # GTSA.__init__: student visiontransformer(drop_path_rate=0.1), hard-coded
    projector_dim: int = 384                # --projector_dim
    projector_layers: int = 2               # Projector(projector_layers=2)
    out_dim: int = 768                      # --out_dim
    predictor_dim: int = 768                # --predictor_dim
    predictor_layers: int = 1               # Predictor(predictor_layers=1)
    rot_hidden_dim: int = 768               # rot_predictor: Linear(384, 768) → Linear(768, 768); input width is
    #                                         hard-coded 384 there (ViT-S only); here it is embed_dim
    rot_bottleneck_dim: int = 128           # rot_predictor: Linear(768, 128) → LayerNorm(128) → Linear(128, 4)
    # --- losses: main_pretrain.py / engine_pretrain.py
    roi_out_size: tuple[int, int] = (10, 4)  # --roi_out_size [10, 4]: (student view global, student view local)
    num_matches: tuple[int, int] = (98, 18)  # --num_matches (98, 18): (global, local) student views
    pc_loss_coef: float = 0.5               # --pc_loss_coef
    pc_warmup_epochs: int = 10              # engine_pretrain.py: pc coef is 0 unless epoch > --warmup_epochs (10),
    #                                         i.e. off for epochs 0..10 (matched)
    rot_pre_coef: float = 0.5               # --rot_pre_coef
    # Which encoder is exported. The official repo has no export script and does not say which encoder the
    # released checkpoints hold; BYOL-style methods evaluate the online (student) network, and MoCo v3's
    # main_lincls.py (whose names GTSA uses) keeps base_encoder, so the student is the default. Recorded by
    # convert.
    export_weights: str = "student"         # student | teacher
