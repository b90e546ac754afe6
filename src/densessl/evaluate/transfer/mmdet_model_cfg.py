"""The ``model`` part of a generated mmdet config: backbone, neck, RPN and RoI heads for the three detectors.

The fixed parts of each detector (assigners, samplers, box coders, losses) are mmdet 3.3.0's base configs
``configs/_base_/models/mask-rcnn_r50_fpn.py`` (FPN) and ``mask-rcnn_r50-caffe-c4.py`` /
``faster-rcnn_r50-caffe-c4.py`` (C4), written out here as code so the config is generated, never copied. What a
protocol changes (classes, norm layers, widths, test thresholds) comes from :class:`DetectionConfig` and what
the backbone dictates (channels, strides) from :class:`BackboneSpec`.

SSL-transfer changes to the mmdet defaults, as MoCo/PixPro/CLoVE's detectron2 configs
(``transfer/detection/configs/Base-RCNN-C4-BN.yaml``): pytorch-style ResNet (stride in the 3x3 conv; "caffe"
style, stride in the 1x1 conv, for MSRA's supervised R-50, whose detectron2 catalog entry is STRIDE_IN_1X1=True),
torchvision RGB mean/std, trainable norm layers (``norm_eval=False``, SyncBN at paper scale) and no frozen stages
(``FREEZE_AT 0``), in the backbone and in the C4 res5 head.
"""

from __future__ import annotations

from typing import Any

from densessl.evaluate.transfer.mmdet_backbone import BackboneSpec, vit_out_indices
from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig

# torchvision / ImageNet statistics in 0..255 RGB: what every densessl backbone was pretrained with
# (PixPro transfer/detection/configs/COCO_R_50_C4_1x_PixPro.yaml PIXEL_MEAN / PIXEL_STD, INPUT.FORMAT RGB).
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def _norm(cfg: DetectionConfig) -> dict[str, Any]:
    return {"type": cfg.norm, "requires_grad": True}


def backbone_cfg(spec: BackboneSpec, cfg: DetectionConfig, c4: bool) -> dict[str, Any]:
    """mmdet backbone dict. ResNet-50 uses mmdet's own ``ResNet``; the smoke ResNet and every ViT use the
    modules registered in ``mmdet_modules.py`` (their key names are torchvision's / timm's)."""
    if spec.family == "vit":
        heads = cfg.vit_num_heads if cfg.vit_num_heads is not None else spec.num_heads
        return {"type": "DenseSSLViTFPN", "arch": spec.arch, "arch_kwargs": dict(spec.arch_kwargs),
                "num_heads": heads, "drop_path_rate": cfg.drop_path_rate,
                "out_indices": list(cfg.vit_out_indices or vit_out_indices(spec.depth)),
                "norm_cfg": _norm(cfg)}
    stages = 3 if c4 else 4
    common: dict[str, Any] = {
        "num_stages": stages, "strides": tuple(spec.stage_strides[:stages]), "dilations": (1,) * stages,
        "out_indices": (2,) if c4 else (0, 1, 2, 3), "frozen_stages": -1, "norm_cfg": _norm(cfg),
        "norm_eval": False, "style": spec.style, "init_cfg": None}
    if spec.is_standard_resnet50:
        return {"type": "ResNet", "depth": 50, **common}
    assert spec.stem is not None
    return {"type": "DenseSSLResNet", "block": spec.block, "stage_blocks": tuple(spec.stage_blocks[:stages]),
            "base_channels": spec.base_channels, "stem_channels": spec.stem["channels"],
            "stem_kernel": spec.stem["kernel"], "stem_stride": spec.stem["stride"], "maxpool": spec.stem["maxpool"],
            **common}


def _rpn(in_channels: int, feat_channels: int, scales: list[int], strides: list[int]) -> dict[str, Any]:
    return {
        "type": "RPNHead", "in_channels": in_channels, "feat_channels": feat_channels,
        "anchor_generator": {"type": "AnchorGenerator", "scales": scales, "ratios": [0.5, 1.0, 2.0],
                             "strides": strides},
        "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
        "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
        "loss_bbox": {"type": "L1Loss", "loss_weight": 1.0}}


def _bbox_losses(smooth_l1: bool) -> dict[str, Any]:
    # Cityscapes: SmoothL1Loss(beta=1.0) (mmdet configs/cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py)
    loss_bbox = ({"type": "SmoothL1Loss", "beta": 1.0, "loss_weight": 1.0} if smooth_l1
                 else {"type": "L1Loss", "loss_weight": 1.0})
    return {"bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4,
                           "target_stds": [0.1, 0.1, 0.2, 0.2]},
            "reg_class_agnostic": False,
            "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
            "loss_bbox": loss_bbox}


def _train_test_cfg(cfg: DetectionConfig, c4: bool, mask_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    rcnn_train: dict[str, Any] = {
        "assigner": {"type": "MaxIoUAssigner", "pos_iou_thr": 0.5, "neg_iou_thr": 0.5, "min_pos_iou": 0.5,
                     "match_low_quality": not c4, "ignore_iof_thr": -1},
        "sampler": {"type": "RandomSampler", "num": cfg.roi_batch, "pos_fraction": 0.25, "neg_pos_ub": -1,
                    "add_gt_as_proposals": True},
        "mask_size": mask_size, "pos_weight": -1, "debug": False}
    train = {
        "rpn": {"assigner": {"type": "MaxIoUAssigner", "pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "min_pos_iou": 0.3,
                             "match_low_quality": True, "ignore_iof_thr": -1},
                "sampler": {"type": "RandomSampler", "num": cfg.rpn_batch, "pos_fraction": 0.5, "neg_pos_ub": -1,
                            "add_gt_as_proposals": False},
                "allowed_border": 0 if c4 else -1, "pos_weight": -1, "debug": False},
        # C4: detectron2's RPN.PRE/POST_NMS_TOPK_TRAIN 12000 / 2000 (mmdet mask-rcnn_r50-caffe-c4.py); FPN: 2000 / 1000
        "rpn_proposal": {"nms_pre": 12000 if c4 else 2000, "max_per_img": 2000 if c4 else 1000,
                         "nms": {"type": "nms", "iou_threshold": 0.7}, "min_bbox_size": 0},
        "rcnn": rcnn_train}
    # C4: RPN test pre/post-NMS top-k 6000 / 1000 (PixPro Base-RCNN-C4-BN.yaml; = mmdet's C4 base)
    test = {
        "rpn": {"nms_pre": 6000 if c4 else 1000, "max_per_img": cfg.rpn_test_proposals,
                "nms": {"type": "nms", "iou_threshold": 0.7},
                "min_bbox_size": 0},
        "rcnn": {"score_thr": cfg.score_thr, "nms": {"type": "nms", "iou_threshold": 0.5},
                 "max_per_img": cfg.max_per_img, "mask_thr_binary": 0.5}}
    return train, test


def detector_cfg(spec: BackboneSpec, cfg: DetectionConfig, detector: str, num_classes: int, mask: bool,
                 smooth_l1: bool = False) -> dict[str, Any]:
    """The full ``model`` dict of a Mask R-CNN (``mask``) or Faster R-CNN."""
    c4 = detector == "c4"
    preprocessor = {"type": "DetDataPreprocessor", "mean": PIXEL_MEAN, "std": PIXEL_STD, "bgr_to_rgb": True,
                    "pad_mask": mask, "pad_size_divisor": 32}
    model: dict[str, Any] = {"type": "MaskRCNN" if mask else "FasterRCNN", "data_preprocessor": preprocessor,
                             "backbone": backbone_cfg(spec, cfg, c4)}
    if c4:
        c4_channels, c4_stride = spec.channels[2], spec.strides[2]
        res5_stride = spec.stage_strides[3]
        res5_size = 14 // res5_stride
        model["rpn_head"] = _rpn(c4_channels, c4_channels, [2, 4, 8, 16, 32], [c4_stride])
        roi: dict[str, Any] = {
            "type": "StandardRoIHead",
            # res5 as the RoI head, with MoCo's extra norm after it (Res5ROIHeadsExtraNorm, PixPro train_net.py)
            "shared_head": {"type": "DenseSSLRes5Head", "block": spec.block, "in_channels": c4_channels,
                            "planes": spec.base_channels * 8, "num_blocks": spec.stage_blocks[3],
                            "stride": res5_stride, "style": spec.style, "norm_cfg": _norm(cfg),
                            "extra_norm": cfg.extra_norm},
            "bbox_roi_extractor": {"type": "SingleRoIExtractor",
                                   "roi_layer": {"type": "RoIAlign", "output_size": 14, "sampling_ratio": 0},
                                   "out_channels": c4_channels, "featmap_strides": [c4_stride]},
            "bbox_head": {"type": "BBoxHead", "with_avg_pool": True, "roi_feat_size": res5_size,
                          "in_channels": spec.channels[3], "num_classes": num_classes, **_bbox_losses(smooth_l1)}}
        if mask:
            roi["mask_roi_extractor"] = None  # C4: the mask head reads the shared res5 features
            roi["mask_head"] = {"type": "FCNMaskHead", "num_convs": 0, "in_channels": spec.channels[3],
                                "conv_out_channels": cfg.mask_channels, "num_classes": num_classes,
                                "loss_mask": {"type": "CrossEntropyLoss", "use_mask": True, "loss_weight": 1.0}}
        mask_size = 2 * res5_size
    else:
        strides = list(spec.strides)
        model["neck"] = {"type": "FPN", "in_channels": list(spec.channels), "out_channels": cfg.neck_channels,
                         "num_outs": 5}
        model["rpn_head"] = _rpn(cfg.neck_channels, cfg.neck_channels, [8], strides + [strides[-1] * 2])
        roi = {
            "type": "StandardRoIHead",
            "bbox_roi_extractor": {"type": "SingleRoIExtractor",
                                   "roi_layer": {"type": "RoIAlign", "output_size": 7, "sampling_ratio": 0},
                                   "out_channels": cfg.neck_channels, "featmap_strides": strides},
            "bbox_head": {"type": "Shared2FCBBoxHead", "in_channels": cfg.neck_channels,
                          "fc_out_channels": cfg.fc_channels, "roi_feat_size": 7, "num_classes": num_classes,
                          **_bbox_losses(smooth_l1)}}
        if mask:
            roi["mask_roi_extractor"] = {"type": "SingleRoIExtractor",
                                         "roi_layer": {"type": "RoIAlign", "output_size": 14, "sampling_ratio": 0},
                                         "out_channels": cfg.neck_channels, "featmap_strides": strides}
            roi["mask_head"] = {"type": "FCNMaskHead", "num_convs": 4, "in_channels": cfg.neck_channels,
                                "conv_out_channels": cfg.mask_channels, "num_classes": num_classes,
                                "loss_mask": {"type": "CrossEntropyLoss", "use_mask": True, "loss_weight": 1.0}}
        mask_size = 28
    model["roi_head"] = roi
    model["train_cfg"], model["test_cfg"] = _train_test_cfg(cfg, c4, mask_size)
    if not mask:
        model["test_cfg"]["rcnn"].pop("mask_thr_binary")
        model["train_cfg"]["rcnn"].pop("mask_size")
    return model
