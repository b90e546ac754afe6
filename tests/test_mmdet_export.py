"""Each backbone export loads into mmdet's own detector with zero missing and zero unexpected backbone keys.

The detector is built by mmdet's ``MODELS`` registry from the generated config, and its weights are initialised
through the toolkit's own ``init_cfg=Pretrained`` path (mmengine_run's ``safetensors://`` loader); every exported
tensor must then equal the detector's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from densessl.checkpoints.io import save_backbone
from densessl.evaluate.transfer.mmdet_backbone import backbone_spec
from densessl.evaluate.transfer.mmdet_config import build_config
from densessl.evaluate.transfer.mmdet_data_cfg import DatasetFiles
from densessl.evaluate.transfer.mmdet_export import export_mmdet
from densessl.evaluate.transfer.mmdet_protocols import PROTOCOLS, DetectionConfig
from densessl.models.backbones import create_backbone
from densessl.models.variants import variant_kwargs

CASES = [
    ("resnet-tiny", {"zero_init_residual": True}, "maskrcnn_r50_fpn_coco"),
    ("resnet-tiny", {"zero_init_residual": True}, "maskrcnn_r50_c4_coco"),
    ("resnet50", {}, "maskrcnn_r50_fpn_coco"),
    ("resnet50", {}, "maskrcnn_r50_c4_coco"),
    ("resnet50", {}, "fasterrcnn_r50_c4_voc"),
    ("resnet50", {"stride_in_1x1": True}, "maskrcnn_r50_fpn_coco"),  # MSRA's caffe-style R-50 (checkpoints/msra.py)
    ("resnet50", {"stride_in_1x1": True}, "maskrcnn_r50_c4_coco"),
    ("vit-tiny-p8", {}, "maskrcnn_vit_fpn_coco"),
    ("vit-tiny-p8", variant_kwargs("selfpatch"), "maskrcnn_vit_fpn_coco"),
    ("vit-tiny-p8", variant_kwargs("loca"), "maskrcnn_vit_fpn_coco"),
    ("vit-s16", {}, "maskrcnn_vit_fpn_coco"),
]


def _build(config):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import densessl.evaluate.transfer.mmdet_modules  # noqa: F401
    from densessl.evaluate.transfer.mmengine_run import register_safetensors_loader

    register_all_modules()
    register_safetensors_loader()
    from mmengine.config import ConfigDict

    return MODELS.build(ConfigDict(config["model"]))  # as the Runner builds it (attribute access to train_cfg)


def _backbone_keys(model_keys: set[str], family: str, detector: str) -> set[str]:
    keys = {k for k in model_keys if k.startswith("backbone.") and not k.startswith("backbone.fpn")}
    if family == "resnet" and detector == "c4":
        keys |= {k for k in model_keys if k.startswith("roi_head.shared_head.layer4.")}
    return keys


@pytest.mark.parametrize("arch,kwargs,protocol", CASES)
def test_export_loads_into_the_mmdet_detector(arch, kwargs, protocol, tmp_path: Path):
    torch.manual_seed(0)
    backbone = create_backbone(arch, **kwargs)
    weights = tmp_path / "backbone.safetensors"
    save_backbone(weights, backbone, arch, kwargs, {"source": "test"})
    spec = backbone_spec(arch, kwargs)
    info = PROTOCOLS[protocol]
    export = export_mmdet(weights, tmp_path / "mmdet.safetensors", spec.family, info["detector"])
    part = {"ann_file": str(tmp_path / "a.json"), "data_prefix": {"img": str(tmp_path)}}
    files = DatasetFiles("coco" if info["evaluator"] == "coco" else "voc", tmp_path, (part,), part,
                         tuple(f"c{i}" for i in range(8)))
    config = build_config(protocol, spec, files, DetectionConfig(norm="BN"), tmp_path / "work", export)
    model = _build(config)

    exported = load_file(str(export))
    model_state = model.state_dict()
    expected = _backbone_keys(set(model_state), spec.family, info["detector"])
    missing = sorted(expected - set(exported))
    unexpected = sorted(set(exported) - set(model_state))
    assert not missing, f"backbone keys the export lacks: {missing[:5]}"
    assert not unexpected, f"exported keys the detector lacks: {unexpected[:5]}"
    assert all(exported[k].shape == model_state[k].shape for k in exported)

    model.init_weights()  # the toolkit's init: its own random init, then init_cfg Pretrained from the export
    loaded = model.state_dict()
    differing = [k for k, v in exported.items() if not torch.equal(loaded[k], v)]
    assert not differing, f"not loaded by init_cfg Pretrained: {differing[:5]}"


@pytest.mark.parametrize("protocol", ["maskrcnn_r50_fpn_coco", "maskrcnn_r50_c4_coco"])
def test_caffe_style_backbone_strides_where_ours_does(protocol, tmp_path: Path):
    """A stride_in_1x1 ResNet-50 gives mmdet a style='caffe' ResNet (and res5 head) that computes our features."""
    from densessl.models.resnet import feature_grid

    torch.manual_seed(0)
    kwargs = {"stride_in_1x1": True}
    backbone = create_backbone("resnet50", **kwargs).eval()
    weights = tmp_path / "backbone.safetensors"
    save_backbone(weights, backbone, "resnet50", kwargs, {"source": "test"})
    spec = backbone_spec("resnet50", kwargs)
    assert spec.style == "caffe"
    info = PROTOCOLS[protocol]
    export = export_mmdet(weights, tmp_path / "mmdet.safetensors", spec.family, info["detector"])
    part = {"ann_file": str(tmp_path / "a.json"), "data_prefix": {"img": str(tmp_path)}}
    files = DatasetFiles("coco", tmp_path, (part,), part, tuple(f"c{i}" for i in range(8)))
    config = build_config(protocol, spec, files, DetectionConfig(norm="BN"), tmp_path / "work", export)
    model = _build(config)
    model.init_weights()
    model.eval()
    c4 = info["detector"] == "c4"
    res5 = model.roi_head.shared_head.layer4 if c4 else model.backbone.layer4
    for layer in (model.backbone.layer2, model.backbone.layer3, res5):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        want = feature_grid(backbone, x)
        feats = model.backbone(x)
        got = res5(feats[-1]) if c4 else feats[-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
