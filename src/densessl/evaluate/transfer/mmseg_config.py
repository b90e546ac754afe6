"""The mmsegmentation config of the ADE20K transfer protocols, generated from our settings.

Two decoders on a ViT with four block outputs:

* ``semfpn`` (Semantic FPN, 40k iterations): the official configs of SelfPatch (alinlab/SelfPatch,
  ``segmentation/configs/semfpn_vit-s16_512x512_40k_ade20k.py``) and GTSA (bok3948/GTSA,
  ``downstream/mmseg/my_configs/CoCo_GTSA_pretrained_semfpn_vit-s16_512_512_40k_ade20k.py``): FPN 4×D → 256,
  ``FPNHead`` (channels 128, dropout 0.1, SyncBN), AdamW lr 6e-5 wd 0.01 with no decay on ``pos_embed``,
  ``cls_token``, ``norm``, 1500-iteration linear warm-up from 1e-6, poly (power 1, min 0), mmseg's stock
  ``ade20k.py`` data pipeline and ``schedule_40k.py`` loops. Both feed the four stride-16 block outputs to FPN
  directly (no multi-level adaptor): ``adaptor: none``.
* ``upernet`` (UperNet, 160k iterations): SelfPatch's README quotes UperNet 160k without a config; the template
  is mmseg's own ViT-S UperNet (mmsegmentation v1.2.2 ``configs/vit/vit_deit-s16_mln_upernet_8xb2-160k_
  ade20k-512x512.py`` over ``_base_/models/upernet_vit-b16_ln_mln.py``): ``MultiLevelNeck`` (scales 4, 2, 1,
  0.5: the multi-level adaptor, ``adaptor: multilevel``), ``UPerHead`` (channels 512, pool scales 1-2-3-6),
  auxiliary ``FCNHead`` on the last level (channels 256, loss weight 0.4), the same AdamW and warm-up + poly.

Every number comes from :class:`MMSegSettings`, whose defaults are the published values (the paper preset
repeats them with their sources); smoke scale changes numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densessl.errors import ConfigError

if TYPE_CHECKING:  # mmseg_export imports torch; the settings check builds MMSegSettings without it
    from densessl.evaluate.transfer.mmseg_export import ViTSpec

DECODERS = ("semfpn", "upernet")
ADAPTORS = ("none", "multilevel")
# mmseg ``MultiLevelNeck`` scales of the ViT UperNet template: strides 4, 8, 16, 32 from the stride-16 tokens.
MULTILEVEL_SCALES = (4, 2, 1, 0.5)


@dataclass
class MMSegSettings:
    """One block of ``evaluate.semfpn`` / ``evaluate.upernet``; defaults are Semantic FPN 40k's published values
    (official SelfPatch/GTSA configs above, mmseg's stock ``ade20k.py`` and ``schedule_40k.py``)."""

    decoder: str = "semfpn"                 # set by the protocol: semfpn_ade20k | upernet_ade20k
    adaptor: str = "none"                   # none (official SemFPN configs) | multilevel (mmseg ViT UperNet)
    iterations: int = 40_000                # schedule_40k: IterBasedTrainLoop max_iters=40000
    batch_size: int = 16                    # global; GTSA: samples_per_gpu=2 on 8 GPUs (tools/dist_train.sh ... 8)
    lr: float = 6e-5                        # optimizer AdamW lr=0.00006
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    no_decay_keys: tuple[str, ...] = ("pos_embed", "cls_token", "norm")  # paramwise_cfg decay_mult=0.
    warmup_iters: int = 1500                # lr_config warmup='linear', warmup_iters=1500
    warmup_ratio: float = 1e-6              # warmup_ratio=1e-6
    poly_power: float = 1.0                 # policy='poly', power=1.0
    min_lr: float = 0.0                     # min_lr=0.0
    crop_size: int = 512                    # crop_size = (512, 512)
    base_scale: tuple[int, int] = (2048, 512)  # ade20k.py RandomResize scale=(2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: bool = True                # PhotoMetricDistortion
    drop_path: float = 0.1                  # SelfPatch semfpn config drop_path_rate=0.1 (GTSA's: 0.0)
    final_norm: bool = False                # mmseg ViT default, kept by every official config
    fpn_channels: int = 256                 # neck FPN out_channels=256
    fpn_head_channels: int = 128            # FPNHead channels=128
    upernet_channels: int = 512             # UPerHead channels=512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = 256                 # auxiliary FCNHead channels=256
    aux_loss_weight: float = 0.4
    dropout: float = 0.1                    # dropout_ratio=0.1
    sync_bn: bool = True                    # norm_cfg SyncBN (mmengine reverts it to BN in one process)
    val_interval: int = 4000                # schedule_40k val_interval=4000; 0 = validate only at the end
    checkpoint_interval: int = 4000         # CheckpointHook interval=4000
    max_keep_checkpoints: int = 2
    log_interval: int = 50                  # LoggerHook interval=50
    num_workers: int = 4                    # ade20k.py num_workers=4
    max_train_items: int | None = None      # first N images (smoke runs)
    max_val_items: int | None = None
    seed: int = 0                           # GTSA: --seed 0
    deterministic: bool = False             # GTSA passes --deterministic; a flag (slower cuDNN)

    def validate(self) -> None:
        name = f"evaluate.{self.decoder}"
        if self.decoder not in DECODERS:
            raise ConfigError(f"{name}: decoder={self.decoder!r}; choose one of {DECODERS}")
        if self.adaptor not in ADAPTORS:
            raise ConfigError(f"{name}: adaptor={self.adaptor!r}; choose one of {ADAPTORS}")
        for key in ("iterations", "batch_size", "crop_size", "checkpoint_interval", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}: {key}={getattr(self, key)} must be >= 1")
        if self.warmup_iters < 0 or self.val_interval < 0 or self.num_workers < 0:
            raise ConfigError(f"{name}: warmup_iters, val_interval and num_workers must be >= 0")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ConfigError(f"{name}: ratio_range={list(self.ratio_range)} must satisfy 0 < lo <= hi")
        self.base_scale = tuple(int(v) for v in self.base_scale)  # type: ignore[assignment]
        self.ratio_range = (float(lo), float(hi))
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.no_decay_keys = tuple(self.no_decay_keys)
        self.pool_scales = tuple(int(s) for s in self.pool_scales)


def _backbone(spec: ViTSpec, s: MMSegSettings, weights_uri: str) -> dict[str, Any]:
    act: dict[str, Any] = dict(type="GELU")
    if spec.gelu_tanh:  # LOCA's flax ViT: tanh-approximated GELU (torch nn.GELU takes it as a keyword)
        act["approximate"] = "tanh"
    return dict(
        type="VisionTransformer", img_size=(s.crop_size, s.crop_size), patch_size=spec.patch_size, in_channels=3,
        embed_dims=spec.embed_dims, num_layers=spec.num_layers, num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio, out_indices=spec.out_indices(), qkv_bias=True,
        # mmseg 1.x builds the patch projection without bias unless asked (patch_bias=False by default); the
        # official mmseg 0.x runs had one (0.x's PatchEmbed always has a bias), and so do our ViTs
        patch_bias=True, drop_rate=0.0,
        attn_drop_rate=0.0, drop_path_rate=s.drop_path, with_cls_token=spec.class_token,
        norm_cfg=dict(type="LN", eps=1e-6), act_cfg=act, norm_eval=False, interpolate_mode="bicubic",
        final_norm=s.final_norm, init_cfg=dict(type="Pretrained", checkpoint=weights_uri))


def _multilevel(dims: int) -> dict[str, Any]:
    return dict(type="MultiLevelNeck", in_channels=[dims] * 4, out_channels=dims, scales=list(MULTILEVEL_SCALES))


def _decoder(spec: ViTSpec, s: MMSegSettings, norm: dict[str, Any], num_classes: int) -> dict[str, Any]:
    d = spec.embed_dims
    loss = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    if s.decoder == "semfpn":
        fpn = dict(type="FPN", in_channels=[d] * 4, out_channels=s.fpn_channels, num_outs=4)
        neck: Any = [_multilevel(d), fpn] if s.adaptor == "multilevel" else fpn
        head = dict(type="FPNHead", in_channels=[s.fpn_channels] * 4, in_index=[0, 1, 2, 3],
                    feature_strides=[4, 8, 16, 32], channels=s.fpn_head_channels, dropout_ratio=s.dropout,
                    num_classes=num_classes, norm_cfg=norm, align_corners=False, loss_decode=loss)
        return dict(neck=neck, decode_head=head)
    out: dict[str, Any] = dict(
        decode_head=dict(type="UPerHead", in_channels=[d] * 4, in_index=[0, 1, 2, 3], pool_scales=s.pool_scales,
                         channels=s.upernet_channels, dropout_ratio=s.dropout, num_classes=num_classes,
                         norm_cfg=norm, align_corners=False, loss_decode=loss),
        auxiliary_head=dict(type="FCNHead", in_channels=d, in_index=3, channels=s.aux_channels, num_convs=1,
                            concat_input=False, dropout_ratio=s.dropout, num_classes=num_classes, norm_cfg=norm,
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                             loss_weight=s.aux_loss_weight)))
    if s.adaptor == "multilevel":
        out["neck"] = _multilevel(d)
    return out


def _pipelines(s: MMSegSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """mmseg ``configs/_base_/datasets/ade20k.py`` (v1.2.2) with our sizes."""
    crop = (s.crop_size, s.crop_size)
    train = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
             dict(type="RandomResize", scale=s.base_scale, ratio_range=s.ratio_range, keep_ratio=True),
             dict(type="RandomCrop", crop_size=crop, cat_max_ratio=s.cat_max_ratio),
             dict(type="RandomFlip", prob=s.flip)]
    if s.photometric:
        train.append(dict(type="PhotoMetricDistortion"))
    train.append(dict(type="PackSegInputs"))
    test = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=s.base_scale, keep_ratio=True),
            dict(type="LoadAnnotations", reduce_zero_label=True), dict(type="PackSegInputs")]
    return train, test


def _loader(root: Path, split: str, pipeline: list[dict[str, Any]], batch: int, workers: int, train: bool,
            limit: int | None) -> dict[str, Any]:
    dataset: dict[str, Any] = dict(type="ADE20KDataset", data_root=str(root), pipeline=pipeline,
                                   data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"))
    if limit is not None:
        dataset["indices"] = int(limit)
    return dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                sampler=dict(type="InfiniteSampler" if train else "DefaultSampler", shuffle=train),
                dataset=dataset)


def _schedule(s: MMSegSettings) -> list[dict[str, Any]]:
    poly = dict(type="PolyLR", eta_min=s.min_lr, power=s.poly_power, begin=min(s.warmup_iters, s.iterations),
                end=s.iterations, by_epoch=False)
    if s.warmup_iters == 0:
        return [poly]
    warm_end = min(s.warmup_iters, s.iterations)
    warm = dict(type="LinearLR", start_factor=s.warmup_ratio, by_epoch=False, begin=0, end=warm_end)
    # a run no longer than its warm-up (a few smoke iterations) has no poly phase: mmengine refuses begin == end
    return [warm] if warm_end >= s.iterations else [warm, poly]


def build_mmseg_config(spec: ViTSpec, s: MMSegSettings, data_root: Path, weights_uri: str,
                       mean: tuple[float, float, float], std: tuple[float, float, float],
                       world_size: int = 1, num_classes: int = 150) -> dict[str, Any]:
    """The full toolkit config (a dict ``mmengine.config.Config`` takes); ``mean``/``std`` in [0, 1] units."""
    if s.batch_size % world_size:
        raise ConfigError(f"evaluate.{s.decoder}: batch_size={s.batch_size} does not split over {world_size} "
                          f"processes; use a multiple of {world_size}")
    norm = dict(type="SyncBN" if s.sync_bn else "BN", requires_grad=True)
    crop = (s.crop_size, s.crop_size)
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[255.0 * m for m in mean],
                               std=[255.0 * v for v in std], bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                               size=crop),
        backbone=_backbone(spec, s, weights_uri), **_decoder(spec, s, norm, num_classes),
        train_cfg=dict(), test_cfg=dict(mode="whole"))
    train_pipe, test_pipe = _pipelines(s)
    per_gpu = s.batch_size // world_size
    val_loader = _loader(data_root, "validation", test_pipe, 1, s.num_workers, False, s.max_val_items)
    evaluator = dict(type="DensesslIoUMetric", iou_metrics=["mIoU"])
    cfg: dict[str, Any] = dict(
        model=model,
        train_dataloader=_loader(data_root, "training", train_pipe, per_gpu, s.num_workers, True, s.max_train_items),
        test_dataloader=val_loader, test_evaluator=evaluator, test_cfg=dict(type="TestLoop"),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=s.iterations,
                       val_interval=s.val_interval or s.iterations),
        optim_wrapper=dict(type="OptimWrapper",
                           optimizer=dict(type="AdamW", lr=s.lr, betas=s.betas, weight_decay=s.weight_decay),
                           paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.0) for k in s.no_decay_keys})),
        param_scheduler=_schedule(s),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=s.log_interval, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=s.checkpoint_interval,
                            max_keep_ckpts=s.max_keep_checkpoints, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook"),
            visualization=dict(type="SegVisualizationHook")),
        env_cfg=dict(cudnn_benchmark=not s.deterministic),
        vis_backends=[dict(type="LocalVisBackend")],
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")]),
        log_processor=dict(by_epoch=False),
    )
    if s.val_interval:
        cfg.update(val_dataloader=val_loader, val_evaluator=evaluator, val_cfg=dict(type="ValLoop"))
    return cfg
