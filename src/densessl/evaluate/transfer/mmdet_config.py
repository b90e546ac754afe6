"""One generated mmdet config dict per (protocol, backbone, dataset): model + data + schedule + runtime.

The schedule is mmdet's ``_base_/schedules/schedule_1x.py`` shape (linear warm-up, multi-step decay, SGD) or
its iteration-based form (``configs/pascal_voc/faster-rcnn_r50-caffe-c4_ms-18k_voc0712.py``'s
``IterBasedTrainLoop`` + ``InfiniteSampler``) for the detectron2 protocols that count iterations; the numbers come
from :class:`DetectionConfig`. The ViT recipe's AdamW has no weight decay on ``pos_embed``, ``cls_token`` and
norm layers (SelfPatch/GTSA configs ``paramwise_cfg``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from densessl.evaluate.transfer.mmdet_backbone import BackboneSpec
from densessl.evaluate.transfer.mmdet_data_cfg import DatasetFiles, dataloaders, evaluator
from densessl.evaluate.transfer.mmdet_export import init_prefixes
from densessl.evaluate.transfer.mmdet_model_cfg import detector_cfg
from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig, protocol_info


def _optim_wrapper(cfg: DetectionConfig) -> dict[str, Any]:
    if cfg.optimizer == "sgd":
        optimizer: dict[str, Any] = {"type": "SGD", "lr": cfg.lr, "momentum": cfg.momentum,
                                     "weight_decay": cfg.weight_decay}
    else:
        optimizer = {"type": "AdamW", "lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    wrapper: dict[str, Any] = {"type": "AmpOptimWrapper" if cfg.amp else "OptimWrapper", "optimizer": optimizer}
    if cfg.no_decay_keys:
        wrapper["paramwise_cfg"] = {"custom_keys": {k: {"decay_mult": 0.0} for k in cfg.no_decay_keys}}
    return wrapper


def _schedule(cfg: DetectionConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if cfg.by_epoch:
        loop: dict[str, Any] = {"type": "EpochBasedTrainLoop", "max_epochs": cfg.max_length,
                                "val_interval": cfg.max_length + 1}
    else:
        loop = {"type": "IterBasedTrainLoop", "max_iters": cfg.max_length, "val_interval": cfg.max_length + 1}
    schedulers: list[dict[str, Any]] = []
    if cfg.warmup_iters > 0:
        schedulers.append({"type": "LinearLR", "start_factor": cfg.warmup_ratio, "by_epoch": False, "begin": 0,
                           "end": cfg.warmup_iters})
    schedulers.append({"type": "MultiStepLR", "begin": 0, "end": cfg.max_length, "by_epoch": cfg.by_epoch,
                       "milestones": list(cfg.milestones), "gamma": 0.1})
    return loop, schedulers


def _module(model: dict[str, Any], path: str) -> dict[str, Any]:
    for part in path.split("."):
        model = model[part]
    return model


def build_config(protocol: str, spec: BackboneSpec, files: DatasetFiles, cfg: DetectionConfig, work_dir: Path,
                 pretrained: Path | None) -> dict[str, Any]:
    """The whole config dict mmengine's ``Runner.from_cfg`` takes (mmengine_run adds the run's fields).

    ``pretrained`` is the backbone exported in mmdet's key layout (``mmdet_export.py``): the backbone (and for
    C4 the res5 RoI head) get ``init_cfg=dict(type='Pretrained', checkpoint='safetensors://...', prefix=...)``,
    the toolkit's own loading path; None trains from the detector's own initialisation."""
    info = protocol_info(protocol)
    if spec.family not in info["backbones"]:
        from densessl.errors import ConfigError

        raise ConfigError(f"{protocol}: takes {' and '.join(info['backbones'])} backbones, not {spec.arch}")
    model = detector_cfg(spec, cfg, info["detector"], len(files.classes), info["mask"],
                         smooth_l1=files.kind == "cityscapes")
    train_loader, test_loader = dataloaders(files, cfg, info["mask"])
    loop, schedulers = _schedule(cfg)
    if pretrained is not None:
        from densessl.evaluate.transfer.mmengine_run import safetensors_uri

        for module, prefix in init_prefixes(spec.family, info["detector"]).items():
            _module(model, module)["init_cfg"] = {"type": "Pretrained", "checkpoint": safetensors_uri(pretrained),
                                                  "prefix": prefix}
    test_eval = evaluator(files, info["mask"], work_dir)
    return {
        "default_scope": "mmdet",
        "work_dir": str(work_dir),
        "model": model,
        "train_dataloader": train_loader,
        "train_cfg": loop,
        "val_dataloader": None, "val_cfg": None, "val_evaluator": None,  # one evaluation, at the end (test)
        "test_dataloader": test_loader, "test_cfg": {"type": "TestLoop"}, "test_evaluator": test_eval,
        "optim_wrapper": _optim_wrapper(cfg),
        "param_scheduler": schedulers,
        "auto_scale_lr": {"enable": False, "base_batch_size": cfg.total_batch},
        "default_hooks": {
            "timer": {"type": "IterTimerHook"},
            "logger": {"type": "LoggerHook", "interval": cfg.log_interval},
            "param_scheduler": {"type": "ParamSchedulerHook"},
            "checkpoint": {"type": "CheckpointHook", "by_epoch": cfg.by_epoch,
                           "interval": 1 if cfg.by_epoch else max(1, min(cfg.max_length, 5000)),
                           "max_keep_ckpts": 1},
            "sampler_seed": {"type": "DistSamplerSeedHook"}},
        "env_cfg": {"cudnn_benchmark": False, "mp_cfg": {"mp_start_method": "fork", "opencv_num_threads": 0},
                    "dist_cfg": {"backend": "nccl"}},
        "log_processor": {"type": "LogProcessor", "window_size": 50, "by_epoch": cfg.by_epoch},
        "log_level": "INFO",
        "randomness": {"seed": cfg.seed},
    }
