"""The generated mmsegmentation configs of semfpn_ade20k and upernet_ade20k at both presets, built without
training, with the published values asserted (official SelfPatch/GTSA Semantic FPN configs, mmseg's ViT-S
UperNet 160k config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from densessl.config import EVALUATIONS, load_config
from densessl.errors import ConfigError
from densessl.evaluate.transfer.mmseg_config import MMSegSettings, build_mmseg_config
from densessl.evaluate.transfer.mmseg_export import ViTSpec
from densessl.methods.base import build_dataclass
from densessl.stages.evaluate import _protocol, _protocol_settings

VIT_S16 = ViTSpec(embed_dims=384, num_layers=12, num_heads=6, mlp_ratio=4.0, patch_size=16, img_size=224,
                  class_token=True, has_final_norm=True, gelu_tanh=False)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def generated(preset: str, protocol: str, world_size: int = 1, spec: ViTSpec = VIT_S16) -> dict[str, Any]:
    cfg = load_config([], preset=preset)
    config_cls, _ = _protocol(protocol)
    settings = build_dataclass(config_cls, _protocol_settings(cfg, protocol), protocol)
    settings.validate()
    return build_mmseg_config(spec, settings, Path("/data/ADEChallengeData2016"), "safetensors:///w.safetensors",
                              MEAN, STD, world_size=world_size)


def _common_published(c: dict[str, Any]) -> None:
    optim = c["optim_wrapper"]
    assert optim["optimizer"] == dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    assert optim["paramwise_cfg"]["custom_keys"] == {k: dict(decay_mult=0.0) for k in ("pos_embed", "cls_token", "norm")}
    warm, poly = c["param_scheduler"]
    assert warm == dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500)
    assert (poly["type"], poly["power"], poly["eta_min"], poly["begin"]) == ("PolyLR", 1.0, 0.0, 1500)
    assert poly["end"] == c["train_cfg"]["max_iters"]
    bb = c["model"]["backbone"]
    assert bb["img_size"] == (512, 512) and bb["patch_size"] == 16 and bb["embed_dims"] == 384
    assert bb["num_layers"] == 12 and bb["num_heads"] == 6 and bb["mlp_ratio"] == 4.0
    assert bb["out_indices"] == (2, 5, 8, 11) and bb["qkv_bias"] and bb["with_cls_token"] and bb["patch_bias"]
    assert bb["norm_cfg"] == dict(type="LN", eps=1e-6) and bb["interpolate_mode"] == "bicubic"
    assert bb["drop_path_rate"] == 0.1 and bb["final_norm"] is False
    assert bb["init_cfg"] == dict(type="Pretrained", checkpoint="safetensors:///w.safetensors")
    train = c["train_dataloader"]
    assert train["batch_size"] == 2  # 16 images over 8 GPUs
    pipe = {step["type"]: step for step in train["dataset"]["pipeline"]}
    assert pipe["RandomResize"]["scale"] == (2048, 512) and pipe["RandomResize"]["ratio_range"] == (0.5, 2.0)
    assert pipe["RandomCrop"] == dict(type="RandomCrop", crop_size=(512, 512), cat_max_ratio=0.75)
    assert pipe["RandomFlip"]["prob"] == 0.5 and "PhotoMetricDistortion" in pipe
    assert pipe["LoadAnnotations"]["reduce_zero_label"] is True
    assert train["dataset"]["type"] == "ADE20KDataset"
    assert train["dataset"]["data_prefix"] == dict(img_path="images/training", seg_map_path="annotations/training")
    test = c["test_dataloader"]["dataset"]
    assert test["data_prefix"] == dict(img_path="images/validation", seg_map_path="annotations/validation")
    assert c["model"]["test_cfg"] == dict(mode="whole")
    assert c["test_evaluator"]["iou_metrics"] == ["mIoU"]
    assert c["model"]["data_preprocessor"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert c["model"]["data_preprocessor"]["std"] == pytest.approx([58.395, 57.12, 57.375])


def test_semfpn_paper_config_has_the_published_values() -> None:
    c = generated("paper", "semfpn_ade20k", world_size=8)
    _common_published(c)
    assert c["train_cfg"] == dict(type="IterBasedTrainLoop", max_iters=40_000, val_interval=4000)
    assert c["default_hooks"]["checkpoint"]["interval"] == 4000
    assert c["model"]["neck"] == dict(type="FPN", in_channels=[384] * 4, out_channels=256, num_outs=4)
    head = c["model"]["decode_head"]
    assert head["type"] == "FPNHead" and head["in_channels"] == [256] * 4
    assert head["feature_strides"] == [4, 8, 16, 32] and head["channels"] == 128 and head["dropout_ratio"] == 0.1
    assert head["num_classes"] == 150 and head["norm_cfg"] == dict(type="SyncBN", requires_grad=True)
    assert "auxiliary_head" not in c["model"]


def test_upernet_paper_config_has_the_published_values() -> None:
    c = generated("paper", "upernet_ade20k", world_size=8)
    _common_published(c)
    assert c["train_cfg"] == dict(type="IterBasedTrainLoop", max_iters=160_000, val_interval=16_000)
    assert c["model"]["neck"] == dict(type="MultiLevelNeck", in_channels=[384] * 4, out_channels=384,
                                      scales=[4, 2, 1, 0.5])
    head, aux = c["model"]["decode_head"], c["model"]["auxiliary_head"]
    assert head["type"] == "UPerHead" and head["in_channels"] == [384] * 4 and head["channels"] == 512
    assert head["pool_scales"] == (1, 2, 3, 6) and head["num_classes"] == 150
    assert aux["type"] == "FCNHead" and aux["in_channels"] == 384 and aux["in_index"] == 3
    assert aux["channels"] == 256 and aux["loss_decode"]["loss_weight"] == 0.4


def test_defaults_equal_the_paper_preset() -> None:
    """The dataclass defaults are Semantic FPN's published values, so a config that omits a field stays faithful."""
    cfg = load_config([], preset="paper")
    block = _protocol_settings(cfg, "semfpn_ade20k")
    defaults = MMSegSettings()
    for key, value in block.items():
        want = getattr(defaults, key)
        assert (tuple(value) if isinstance(value, list) else value) == want, key


@pytest.mark.parametrize("protocol", ["semfpn_ade20k", "upernet_ade20k"])
def test_smoke_config_is_small_and_in_the_smoke_dag(protocol: str) -> None:
    cfg = load_config([], preset="smoke")
    assert protocol in cfg.evaluations
    assert EVALUATIONS[protocol]["backbones"] == ("vit",)
    spec = ViTSpec(embed_dims=128, num_layers=4, num_heads=4, mlp_ratio=4.0, patch_size=8, img_size=64,
                   class_token=True, has_final_norm=True, gelu_tanh=False)
    c = generated("smoke", protocol, spec=spec)
    assert c["train_cfg"]["max_iters"] <= 200 and c["model"]["backbone"]["img_size"] == (64, 64)
    assert c["model"]["backbone"]["out_indices"] == (0, 1, 2, 3)
    assert c["train_dataloader"]["num_workers"] == 0


def test_adaptor_flag_puts_the_multilevel_neck_before_fpn() -> None:
    s = MMSegSettings(adaptor="multilevel")
    c = build_mmseg_config(VIT_S16, s, Path("/d"), "safetensors:///w", MEAN, STD)
    assert [n["type"] for n in c["model"]["neck"]] == ["MultiLevelNeck", "FPN"]


def test_no_cls_backbones_drop_the_token_and_loca_keeps_tanh_gelu() -> None:
    spec = ViTSpec(embed_dims=384, num_layers=12, num_heads=6, mlp_ratio=4.0, patch_size=16, img_size=224,
                   class_token=False, has_final_norm=True, gelu_tanh=True)
    bb = build_mmseg_config(spec, MMSegSettings(), Path("/d"), "safetensors:///w", MEAN, STD)["model"]["backbone"]
    assert bb["with_cls_token"] is False and bb["act_cfg"] == dict(type="GELU", approximate="tanh")


def test_bad_settings_give_one_line() -> None:
    with pytest.raises(ConfigError, match="adaptor='fpn'"):
        MMSegSettings(adaptor="fpn").validate()
    with pytest.raises(ConfigError, match="does not split over 8 processes"):
        build_mmseg_config(VIT_S16, MMSegSettings(batch_size=12), Path("/d"), "x", MEAN, STD, world_size=8)
    with pytest.raises(ConfigError, match="unknown field"):
        build_dataclass(MMSegSettings, {"lr_mult": 1}, "evaluate.semfpn")
    with pytest.raises(ConfigError, match="four block outputs"):
        ViTSpec(128, 2, 4, 4.0, 8, 64, True, True, False).out_indices()


def test_report_takes_each_decoder_its_own_published_table() -> None:
    """Semantic FPN and UperNet share a protocol key; each protocol reads only its own tables."""
    from densessl.config import Run
    from densessl.report.build import REPORTED_METRICS
    from densessl.report.paper_tables import published_value

    dino = Run("dino", "vit-s16", "imagenet")
    assert published_value("semfpn_ade20k", dino, "mIoU", synthetic=False) == 38.3
    assert published_value("upernet_ade20k", dino, "mIoU", synthetic=False) == 42.3
    assert REPORTED_METRICS["semfpn_ade20k"][0] == REPORTED_METRICS["upernet_ade20k"][0] == "mIoU"
