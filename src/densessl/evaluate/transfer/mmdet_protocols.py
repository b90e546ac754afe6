"""The mmdetection transfer protocols: what each one trains and evaluates, and the settings that configure it.

Each protocol is one row of :data:`PROTOCOLS` (the dataset it reads, the detector, the evaluator and the backbone
families it takes) plus one :class:`DetectionConfig` block in the presets. The toolkit config is generated from
these (``mmdet_config.py``); nothing here imports mmdet, so the DAG and the config tests run without it.

Sources of the protocols (every default below is the published value; paper.yaml repeats them with citations):
- ``maskrcnn_vit_fpn_coco``: official repos alinlab/SelfPatch ``detection/configs/selfpatch/
  mask_rcnn_vit_small_12_p16_1x_coco.py`` and bok3948/GTSA ``downstream/mmdet/my_configs/
  CoCo_GTSA_mask_rcnn_vit_small_12_p16_1x_coco.py`` (mmdet 2.x, Swin-style recipe);
- ``maskrcnn_r50_c4_coco`` and ``fasterrcnn_r50_c4_voc``: official repo zdaxie/PixPro (= sthalles/CLoVE)
  ``transfer/detection/configs/{Base-RCNN-C4-BN,COCO_R_50_C4_1x,Pascal_VOC_R_50_C4_24k}.yaml`` (detectron2,
  MoCo's protocol), expressed with mmdet 3.3.0's C4 modules;
- ``maskrcnn_r50_fpn_coco``, ``maskrcnn_r50_fpn_lvis``, ``maskrcnn_r50_fpn_cityscapes``: mmdet 3.3.0
  ``configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py``, ``configs/lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py``,
  ``configs/cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py``, with the SSL-transfer changes of MoCo/PixPro
  (SyncBN, no frozen stages, torchvision RGB normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from densessl.errors import ConfigError

# detector: "vit_fpn" (ViT + multi-level adaptor + FPN), "fpn" (ResNet + FPN), "c4" (ResNet C4 + res5 RoI head)
# tables: the ids in report/paper_tables.yaml whose numbers this protocol reproduces (every detection table
#         names the same protocol key, so the report needs the ids to pick the right one)
# evaluator: "coco" (pycocotools via mmdet CocoMetric), "lvis" (lvis API via LVISMetric),
#            "cityscapes" (cityscapesscripts via CityScapesMetric), "voc" (mmdet VOCMetric)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "maskrcnn_vit_fpn_coco": {"dataset": "coco", "detector": "vit_fpn", "mask": True, "evaluator": "coco",
                              "backbones": ("vit",), "tables": ("selfpatch_coco_maskrcnn", "gtsa_coco_maskrcnn"),
                              "title": "COCO Mask R-CNN 1x, ViT + multi-level adaptor + FPN (SelfPatch/GTSA)"},
    "maskrcnn_r50_c4_coco": {"dataset": "coco", "detector": "c4", "mask": True, "evaluator": "coco",
                             "backbones": ("resnet",), "tables": ("clove_coco_maskrcnn_c4", "pixpro_coco_maskrcnn_c4"),
                             "title": "COCO Mask R-CNN R50-C4 (MoCo/PixPro/CLoVE protocol)"},
    "maskrcnn_r50_fpn_coco": {"dataset": "coco", "detector": "fpn", "mask": True, "evaluator": "coco",
                              "backbones": ("resnet",), "tables": ("clove_coco_maskrcnn_fpn", "pixpro_coco_maskrcnn_fpn"),
                              "title": "COCO Mask R-CNN R50-FPN"},
    "maskrcnn_r50_fpn_lvis": {"dataset": "lvis", "detector": "fpn", "mask": True, "evaluator": "lvis",
                              "backbones": ("resnet",), "tables": ("clove_lvis_maskrcnn_fpn",),
                              "title": "LVIS v1 Mask R-CNN R50-FPN"},
    "maskrcnn_r50_fpn_cityscapes": {"dataset": "cityscapes", "detector": "fpn", "mask": True,
                                    "evaluator": "cityscapes", "backbones": ("resnet",),
                                    "tables": ("clove_cityscapes_maskrcnn_fpn",),
                                    "title": "Cityscapes instance segmentation, Mask R-CNN R50-FPN"},
    "fasterrcnn_r50_c4_voc": {"dataset": "voc", "detector": "c4", "mask": False, "evaluator": "voc",
                              "backbones": ("resnet",), "tables": ("pixpro_voc_c4",),
                              "title": "Pascal VOC07+12 -> VOC07 test, Faster R-CNN R50-C4"},
}

SCHEDULES = ("1x", "2x")


@dataclass
class DetectionConfig:
    """One detection protocol's settings (``evaluate.<protocol>`` in the presets).

    The schedule is counted in one unit: epochs when ``by_epoch`` (mmdet's configs) and iterations otherwise
    (detectron2's). ``schedule`` picks the 1x or 2x entry of ``schedules``, each with its published length and
    decay steps written out (never derived by multiplying the 1x numbers). The learning rate is the one for the total batch ``gpus * batch_size_per_gpu``; a run on
    another number of processes is refused instead of silently changing the published batch.
    """

    schedule: str = "1x"                       # which entry of ``schedules`` this run trains
    schedules: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "1x": {"max_length": 12, "milestones": [8, 11]},     # mmdet _base_/schedules/schedule_1x.py
        "2x": {"max_length": 24, "milestones": [16, 22]}})   # mmdet _base_/schedules/schedule_2x.py
    by_epoch: bool = True
    warmup_iters: int = 500                    # schedule_1x.py LinearLR end=500
    warmup_ratio: float = 0.001                # schedule_1x.py LinearLR start_factor
    repeat_times: int = 1                      # RepeatDataset times (Cityscapes: 8)
    gpus: int = 8
    batch_size_per_gpu: int = 2
    optimizer: str = "sgd"                     # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_keys: tuple[str, ...] = ()        # parameter names without weight decay (ViT: pos_embed, cls_token, norm)
    amp: bool = False
    # data
    train_scales: tuple[int, ...] = (800,)     # short sides; one per image ("choice") or [min, max] ("range")
    multiscale_mode: str = "choice"
    max_size: int = 1333
    test_scale: int = 800
    detr_crop_policy: bool = False             # the DETR-style AutoAugment of the ViT recipe
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size_range: tuple[int, int] = (384, 600)
    flip_prob: float = 0.5
    filter_min_size: int = 32
    oversample_thr: float | None = None        # LVIS ClassBalancedDataset
    # model
    norm: str = "SyncBN"                       # SyncBN | BN (single-process runs fall back to BN statistics)
    extra_norm: bool = True                    # C4: the MoCo Res5ROIHeadsExtraNorm norm after res5
    neck_channels: int = 256
    fc_channels: int = 1024
    mask_channels: int = 256
    rpn_batch: int = 256
    roi_batch: int = 512
    score_thr: float = 0.05
    max_per_img: int = 100
    rpn_test_proposals: int = 1000             # RPN post-NMS proposals per test image (C4 and FPN configs: 1000)
    max_test_images: int | None = None         # None: the whole test split; N: its first N images (by id)
    vit_num_heads: int | None = None           # None: the pretrained backbone's; 8 = SelfPatch's official config
    vit_out_indices: tuple[int, ...] | None = None  # None: blocks 4, 6, 8, 12 of 12 scaled to the depth
    drop_path_rate: float = 0.0
    # runtime
    num_workers: int = 2
    seed: int = 0
    log_interval: int = 50

    def __post_init__(self) -> None:
        where = "evaluate.<detection protocol>"
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: {self.schedule!r}; allowed values: {', '.join(SCHEDULES)}")
        entry = self.schedules.get(self.schedule)
        if not isinstance(entry, dict) or set(entry) != {"max_length", "milestones"}:
            raise ConfigError(f"{where}.schedules.{self.schedule}: needs exactly max_length and milestones, got "
                              f"{entry!r}")
        if self.rpn_test_proposals < 1:
            raise ConfigError(f"{where}.rpn_test_proposals: {self.rpn_test_proposals}; must be ≥ 1")
        if self.max_test_images is not None and self.max_test_images < 1:
            raise ConfigError(f"{where}.max_test_images: {self.max_test_images}; must be ≥ 1, or null for the "
                              f"whole test split")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"{where}.optimizer: {self.optimizer!r}; allowed values: sgd, adamw")
        if self.multiscale_mode not in ("choice", "range"):
            raise ConfigError(f"{where}.multiscale_mode: {self.multiscale_mode!r}; allowed values: choice, range")
        if self.multiscale_mode == "range" and len(self.train_scales) != 2:
            raise ConfigError(f"{where}.train_scales: multiscale_mode 'range' needs [min, max], got "
                              f"{list(self.train_scales)}")
        if self.norm not in ("SyncBN", "BN"):
            raise ConfigError(f"{where}.norm: {self.norm!r}; allowed values: SyncBN, BN")
        if any(m >= self.max_length for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"{where}.milestones: {list(self.milestones)} must increase and lie below "
                              f"max_length {self.max_length}")
        if self.gpus < 1 or self.batch_size_per_gpu < 1 or self.max_length < 1:
            raise ConfigError(f"{where}: gpus, batch_size_per_gpu and max_length must be positive")

    @property
    def max_length(self) -> int:
        """Epochs (``by_epoch``) or iterations of the selected schedule."""
        return int(self.schedules[self.schedule]["max_length"])

    @property
    def milestones(self) -> tuple[int, ...]:
        return tuple(int(m) for m in self.schedules[self.schedule]["milestones"])

    @property
    def total_batch(self) -> int:
        return self.gpus * self.batch_size_per_gpu


def protocol_info(protocol: str) -> dict[str, Any]:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown detection protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]
