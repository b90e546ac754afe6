"""Settings of the COCO keypoint transfer protocol (``keypointrcnn_r50_fpn_coco``).

Defaults are detectron2's ``configs/COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml`` as resolved through its bases
(``Base-Keypoint-RCNN-FPN.yaml`` @ 989f52d, ``Base-RCNN-FPN.yaml`` @ 3169651) and ``detectron2/config/defaults.py``
(@ 084acd0), with the fine-tuning settings the MoCo/PixPro/CLoVE detection transfer uses for self-supervised
ResNets (zdaxie/PixPro @ e390d6b ``transfer/detection/configs/*_PixPro.yaml``: RGB input with torchvision's
ImageNet mean/std, stride in the 3x3 conv; SyncBN and nothing frozen, ``FREEZE_AT 0``). Each field cites where
its value comes from; the smoke preset overrides sizes and lengths only.

CLoVE (paper 2310.00527, Table 5) does not publish its keypoint schedule; 1x is the detectron2 zoo's and
PixPro's detection default. The 3x schedule is ``iterations: 270000, steps: [210000, 250000]``
(``keypoint_rcnn_R_50_FPN_3x.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.errors import ConfigError

NORMS = ("syncbn", "bn", "frozen")


@dataclass
class KeypointRCNNConfig:
    # ---- schedule: Base-RCNN-FPN.yaml SOLVER and defaults.py _C.SOLVER
    iterations: int = 90000          # SOLVER.MAX_ITER 90000 (1x)
    batch_size: int = 16             # SOLVER.IMS_PER_BATCH 16 (8 GPUs x 2 images): the effective batch
    lr: float = 0.02                 # SOLVER.BASE_LR 0.02
    steps: tuple[int, ...] = (60000, 80000)  # SOLVER.STEPS
    gamma: float = 0.1               # SOLVER.GAMMA 0.1
    warmup_iters: int = 1000         # SOLVER.WARMUP_ITERS 1000
    warmup_factor: float = 0.001     # SOLVER.WARMUP_FACTOR 1/1000, WARMUP_METHOD "linear"
    momentum: float = 0.9            # SOLVER.MOMENTUM 0.9 (SGD, NESTEROV False)
    weight_decay: float = 1e-4       # SOLVER.WEIGHT_DECAY 1e-4 (also biases: WEIGHT_DECAY_BIAS = WEIGHT_DECAY)
    weight_decay_norm: float = 0.0   # SOLVER.WEIGHT_DECAY_NORM 0.0 (normalisation layers' affine parameters)
    # ---- input: Base-RCNN-FPN.yaml INPUT and defaults.py _C.INPUT
    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)  # MIN_SIZE_TRAIN, sampling "choice"
    max_size_train: int = 1333       # INPUT.MAX_SIZE_TRAIN 1333
    min_size_test: int = 800         # INPUT.MIN_SIZE_TEST 800
    max_size_test: int = 1333        # INPUT.MAX_SIZE_TEST 1333
    flip_prob: float = 0.5           # INPUT.RANDOM_FLIP "horizontal" (RandomFlip prob 0.5), keypoints flip-mapped
    # ---- backbone and FPN
    norm: str = "syncbn"             # PixPro COCO_R_50_FPN_1x.yaml: RESNETS.NORM SyncBN ('frozen' = d2 stock FrozenBN)
    freeze_at: int = 0               # PixPro: BACKBONE.FREEZE_AT 0 (stock detectron2: 2)
    fpn_channels: int = 256          # FPN.OUT_CHANNELS 256
    # ---- RPN: Base-RCNN-FPN.yaml, Base-Keypoint-RCNN-FPN.yaml, defaults.py _C.MODEL.RPN / ANCHOR_GENERATOR
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # ANCHOR_GENERATOR.SIZES, one per level p2..p6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)      # ANCHOR_GENERATOR.ASPECT_RATIOS
    rpn_pre_nms_top_n_train: int = 2000   # RPN.PRE_NMS_TOPK_TRAIN 2000 (per level)
    rpn_pre_nms_top_n_test: int = 1000    # RPN.PRE_NMS_TOPK_TEST 1000 (per level)
    rpn_post_nms_top_n_train: int = 1500  # Base-Keypoint-RCNN-FPN.yaml RPN.POST_NMS_TOPK_TRAIN 1500 (per image)
    rpn_post_nms_top_n_test: int = 1000   # RPN.POST_NMS_TOPK_TEST 1000
    rpn_nms_thresh: float = 0.7           # RPN.NMS_THRESH 0.7
    rpn_batch_size_per_image: int = 256   # RPN.BATCH_SIZE_PER_IMAGE 256 (positive fraction 0.5)
    # ---- RoI heads: defaults.py _C.MODEL.ROI_HEADS / ROI_BOX_HEAD / ROI_KEYPOINT_HEAD, Base-RCNN-FPN.yaml
    box_batch_size_per_image: int = 512   # ROI_HEADS.BATCH_SIZE_PER_IMAGE 512 (positive fraction 0.25)
    box_head_dim: int = 1024              # ROI_BOX_HEAD NUM_FC 2, FC_DIM 1024 ("FastRCNNConvFCHead")
    box_score_thresh: float = 0.05        # ROI_HEADS.SCORE_THRESH_TEST 0.05
    box_nms_thresh: float = 0.5           # ROI_HEADS.NMS_THRESH_TEST 0.5
    detections_per_image: int = 100       # TEST.DETECTIONS_PER_IMAGE 100
    roi_sampling_ratio: int = 0           # POOLER_SAMPLING_RATIO 0 (adaptive; torchvision's default is 2)
    keypoint_head_channels: tuple[int, ...] = (512,) * 8  # ROI_KEYPOINT_HEAD.CONV_DIMS (512,) * 8
    num_keypoints: int = 17               # ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17
    min_keypoints_per_image: int = 1      # ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE 1 (training images)
    # ---- bookkeeping (ours)
    seed: int = 0
    num_workers: int = 4                  # DATALOADER.NUM_WORKERS 4
    eval_batch_size: int = 8
    checkpoint_every: int = 5000          # SOLVER.CHECKPOINT_PERIOD 5000: iterations between saved states
    max_train_items: int | None = None    # first N training images (after filtering), for short runs
    max_val_items: int | None = None

    def validate(self) -> None:
        where = "evaluate.keypoints config"
        if self.norm not in NORMS:
            raise ConfigError(f"{where}: norm={self.norm!r} is not one of {list(NORMS)}")
        for name in ("iterations", "batch_size", "eval_batch_size", "fpn_channels", "box_head_dim",
                     "num_keypoints", "max_size_train", "min_size_test", "max_size_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.freeze_at <= 5:
            raise ConfigError(f"{where}: freeze_at={self.freeze_at} must be 0 (train all) .. 5 (as detectron2)")
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f"{where}: anchor_sizes needs 5 sizes (FPN levels p2..p6), got {list(self.anchor_sizes)}")
        if not self.min_size_train or min(self.min_size_train) < 1:
            raise ConfigError(f"{where}: min_size_train={list(self.min_size_train)} needs positive sizes")
        if list(self.steps) != sorted(self.steps):
            raise ConfigError(f"{where}: steps={list(self.steps)} must be increasing iteration numbers")
        if not self.keypoint_head_channels:
            raise ConfigError(f"{where}: keypoint_head_channels is empty; detectron2 uses eight 512s")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"{where}: flip_prob={self.flip_prob} must be in [0, 1]")
        if self.warmup_iters < 0 or self.checkpoint_every < 0 or self.num_workers < 0:
            raise ConfigError(f"{where}: warmup_iters, checkpoint_every and num_workers must be >= 0")

    def lr_at(self, iteration: int) -> float:
        """detectron2 ``WarmupMultiStepLR`` (solver/lr_scheduler.py, ``build_lr_scheduler``): lr times
        ``gamma`` per passed step, times a linear warm-up factor from ``warmup_factor`` to 1 over
        ``warmup_iters``."""
        factor = self.gamma ** sum(iteration >= s for s in self.steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return self.lr * factor
