"""detectron2's MSRA R-50.pkl importer: names, frozen-affine BN, caffe stride and the folded input convention.

The reference is MSRA's network written with plain torch ops on the caffe2 arrays (BGR 0-255 minus the BGR mean,
std 1, affine BN, stride in the 1x1 conv); the imported torchvision network fed our RGB mean/std input must equal
it. The file is a constructed one with the real key names and shapes (random arrays), pickled as caffe2 does.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densessl.checkpoints.importers import IMPORTERS, import_checkpoint
from densessl.checkpoints.msra import MSRA_PIXEL_MEAN_BGR, caffe2_to_torchvision, expected_blobs
from densessl.errors import CheckpointError
from densessl.models.resnet import IMAGENET_MEAN, IMAGENET_STD, is_stride_in_1x1

WIDTHS = {2: 64, 3: 128, 4: 256, 5: 512}
BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}


def _shape(name: str) -> tuple[int, ...]:
    if name == "conv1_w":
        return (64, 3, 7, 7)
    if name.startswith("res_conv1_bn"):
        return (64,)
    stage, block = int(name[3]), int(name.split("_")[1])
    planes = WIDTHS[stage]
    inp = (64 if stage == 2 else planes * 2) if block == 0 else planes * 4
    branch = name.split("_")[2]
    out = {"branch1": planes * 4, "branch2a": planes, "branch2b": planes, "branch2c": planes * 4}[branch]
    if name.endswith("_w"):
        cin = {"branch1": inp, "branch2a": inp, "branch2b": planes, "branch2c": planes}[branch]
        k = 3 if branch == "branch2b" else 1
        return (out, cin, k, k)
    return (out,)


def _blobs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    blobs = {}
    for name in expected_blobs():
        shape = _shape(name)
        if name.endswith("_w"):
            fan_in = int(np.prod(shape[1:]))
            blobs[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif name.endswith("_bn_s"):
            blobs[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            blobs[name] = rng.uniform(-0.2, 0.2, shape).astype(np.float32)
    blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    return blobs


def _write(path: Path, obj) -> Path:
    with path.open("wb") as f:
        # protocol 4: Python 3 writes protocol-2 bytes through _codecs.encode, which a real (Python 2) file never
        # holds; the numpy globals are the same in both
        pickle.dump(obj, f, protocol=4)
    return path


def _msra_reference(blobs: dict[str, np.ndarray], bgr_minus_mean: torch.Tensor) -> torch.Tensor:
    """MSRA ResNet-50 up to res5, plain torch ops, double precision: conv, affine BN, ReLU; stride in the 1x1."""
    t = {k: torch.from_numpy(v).double() for k, v in blobs.items()}

    def affine(x, prefix):
        return x * t[prefix + "_s"].view(1, -1, 1, 1) + t[prefix + "_b"].view(1, -1, 1, 1)

    x = F.relu(affine(F.conv2d(bgr_minus_mean, t["conv1_w"], stride=2, padding=3), "res_conv1_bn"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage in range(2, 6):
        for i in range(BLOCKS[stage]):
            p = f"res{stage}_{i}_"
            stride = 2 if (i == 0 and stage > 2) else 1
            y = F.relu(affine(F.conv2d(x, t[p + "branch2a_w"], stride=stride), p + "branch2a_bn"))
            y = F.relu(affine(F.conv2d(y, t[p + "branch2b_w"], padding=1), p + "branch2b_bn"))
            y = affine(F.conv2d(y, t[p + "branch2c_w"]), p + "branch2c_bn")
            short = affine(F.conv2d(x, t[p + "branch1_w"], stride=stride), p + "branch1_bn") if i == 0 else x
            x = F.relu(y + short)
    return x


def test_imported_network_on_our_input_equals_msra_on_its_input(tmp_path: Path):
    blobs = _blobs()
    path = _write(tmp_path / "R-50.pkl", blobs)
    model = import_checkpoint("detectron2_msra", path, "resnet50").double()
    assert is_stride_in_1x1(model)
    assert IMPORTERS["detectron2_msra"].arch_kwargs == {"stride_in_1x1": True}

    torch.manual_seed(0)
    rgb255 = torch.rand(2, 3, 67, 61, dtype=torch.float64) * 255  # odd sizes: padding and strides matter
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1) * 255
    ours = (rgb255 - mean) / std
    bgr_minus_mean = rgb255.flip(1) - torch.tensor(MSRA_PIXEL_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)

    from densessl.models.resnet import feature_grid

    with torch.no_grad():
        got = feature_grid(model, ours)
        want = _msra_reference(blobs, bgr_minus_mean)
    assert got.shape == want.shape == (2, 2048, 3, 2)
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-5
    # float32, as the protocols run it
    with torch.no_grad():
        got32 = feature_grid(model.float(), ours.float()).double()
    assert (got32 - want).abs().max() / scale < 1e-5


def test_bgr_mean_is_the_flipped_imagenet_mean():
    assert MSRA_PIXEL_MEAN_BGR == tuple(round(255 * m, 3) for m in reversed(IMAGENET_MEAN))


def test_batchnorm_is_the_exact_affine(tmp_path: Path):
    blobs = _blobs(1)
    model = import_checkpoint("detectron2_msra", _write(tmp_path / "R-50.pkl", blobs), "resnet50")
    bn = model.layer3[2].bn2
    x = torch.randn(2, bn.num_features, 4, 4)
    s, b = (torch.from_numpy(blobs[f"res4_2_branch2b_bn_{k}"]) for k in "sb")
    with torch.no_grad():
        torch.testing.assert_close(bn(x), x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1), rtol=1e-6, atol=1e-6)
    assert torch.equal(model.layer2[0].downsample[1].weight, torch.from_numpy(blobs["res3_0_branch1_bn_s"]))


def test_key_map():
    assert caffe2_to_torchvision("conv1_w") == "conv1.weight"
    assert caffe2_to_torchvision("res_conv1_bn_s") == "bn1.weight"
    assert caffe2_to_torchvision("res2_0_branch2a_w") == "layer1.0.conv1.weight"
    assert caffe2_to_torchvision("res5_2_branch2c_bn_b") == "layer4.2.bn3.bias"
    assert caffe2_to_torchvision("res2_0_branch1_bn_s") == "layer1.0.downsample.1.weight"
    assert caffe2_to_torchvision("res4_0_branch1_w") == "layer3.0.downsample.0.weight"
    assert caffe2_to_torchvision("fc1000_w") is None


def test_blobs_wrapper_and_momentum_are_accepted(tmp_path: Path):
    blobs = _blobs(2)
    wrapped = {"blobs": {**blobs, "conv1_w_momentum": np.zeros((64, 3, 7, 7), np.float32)}}
    model = import_checkpoint("detectron2_msra", _write(tmp_path / "R-50.pkl", wrapped), "resnet50")
    assert model.layer4[0].conv1.stride == (2, 2) and model.layer4[0].conv2.stride == (1, 1)


def test_missing_and_unknown_blobs_are_named(tmp_path: Path):
    blobs = _blobs(3)
    del blobs["res5_2_branch2c_bn_s"]
    with pytest.raises(CheckpointError, match="res5_2_branch2c_bn_s"):
        import_checkpoint("detectron2_msra", _write(tmp_path / "a.pkl", blobs), "resnet50")
    blobs = {**_blobs(3), "pred_w": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="pred_w"):
        import_checkpoint("detectron2_msra", _write(tmp_path / "b.pkl", blobs), "resnet50")


class _Evil:
    def __reduce__(self):
        return (print, ("ran code",))


@pytest.mark.parametrize("obj", [{"conv1_w": _Evil()}, {"x": {1, 2}.__class__}, {"d": __import__("collections").OrderedDict()}])
def test_only_numpy_arrays_are_unpickled(tmp_path: Path, obj, capsys):
    with pytest.raises(CheckpointError, match="not allowed"):
        import_checkpoint("detectron2_msra", _write(tmp_path / "evil.pkl", obj), "resnet50")
    assert "ran code" not in capsys.readouterr().out


def test_caffe_stride_survives_export_and_reload(tmp_path: Path):
    """convert stores the importer's arch_kwargs; load_backbone (every protocol's loader) rebuilds caffe style."""
    from densessl.checkpoints.io import load_backbone, save_backbone

    model = import_checkpoint("detectron2_msra", _write(tmp_path / "R-50.pkl", _blobs(4)), "resnet50")
    out = tmp_path / "backbone.safetensors"
    save_backbone(out, model, "resnet50", dict(IMPORTERS["detectron2_msra"].arch_kwargs), {"source": "test"})
    loaded, meta = load_backbone(out)
    assert meta["arch_kwargs"] == {"stride_in_1x1": True}
    for layer in (loaded.layer2, loaded.layer3, loaded.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert loaded.layer1[0].conv1.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


def test_msra_release_converts_to_a_caffe_style_backbone(tmp_path: Path):
    """The paper preset's entry, pointed at a local file: convert stores stride_in_1x1 and the folded weights."""
    import yaml
    from conftest import REPO

    from densessl.checkpoints.io import load_backbone
    from densessl.config import load_config
    from densessl.stages.convert import run_convert

    blobs = _blobs(5)
    file = _write(tmp_path / "R-50.pkl", blobs)
    spec = {"method": "imagenet-supervised", "arch": "resnet50", "data": "imagenet", "format": "detectron2_msra",
            "path": str(file)}
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "released": [spec]}))
    cfg = load_config([cfg_file], root=REPO)
    run = cfg.run("imagenet-supervised/resnet50-imagenet-released")
    model, meta = load_backbone(run_convert(cfg, run.id))
    assert meta["arch_kwargs"] == {"stride_in_1x1": True} and meta["source"]["format"] == "detectron2_msra"
    assert model.layer3[0].conv1.stride == (2, 2) and model.layer3[0].conv2.stride == (1, 1)
    want = torch.from_numpy(blobs["conv1_w"]).flip(1) * torch.tensor([255 * s for s in IMAGENET_STD]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.conv1.weight, want)
