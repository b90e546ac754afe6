"""ResNet backbones: torchvision key parity, CLoVE init, geometry of the last feature map."""

from __future__ import annotations

import pytest
import torch
import torchvision

from densessl.errors import ConfigError
from densessl.models.resnet import RESNET_ARCHS, create_resnet, feature_grid, resnet_info


def test_resnet50_state_dict_keys_and_shapes_equal_torchvision():
    ours = create_resnet("resnet50").state_dict()
    ref = torchvision.models.resnet50(weights=None).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert "layer4.2.bn3.weight" in ours and "fc.weight" in ours


def test_resnet50_info_and_zero_init_residual():
    model = create_resnet("resnet50", zero_init_residual=True)
    info = resnet_info(model)
    assert (info.output_stride, info.feature_dim, info.img_size) == (32, 2048, 224)
    assert (info.patch_size, info.embed_dim, info.num_prefix_tokens) == (32, 2048, 0)
    # CLoVE contrast/resnet.py: each bottleneck's last BN gamma starts at 0, other BN gammas at 1
    assert torch.count_nonzero(model.layer2[1].bn3.weight) == 0
    assert torch.all(model.layer2[1].bn2.weight == 1)
    # conv init normal(0, sqrt(2/n)), n = k·k·out_channels: layer4.0.conv2 has n = 9·512
    w = model.layer4[0].conv2.weight
    assert abs(w.std().item() - (2 / (9 * 512)) ** 0.5) < 0.02 * (2 / (9 * 512)) ** 0.5 + 1e-4


def test_resnet50_dilation_changes_output_stride():
    model = create_resnet("resnet50", replace_stride_with_dilation=[False, False, True])
    assert resnet_info(model).output_stride == 16


def test_tiny_resnet_grid_and_key_layout():
    model = create_resnet("resnet-tiny").eval()
    info = resnet_info(model)
    assert (info.output_stride, info.feature_dim, info.img_size) == (8, 128, 64)
    assert isinstance(model, torchvision.models.ResNet)
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "layer4.0.bn2.weight", "fc.weight"} <= keys
    grid = feature_grid(model, torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, 128, 8, 8)
    assert feature_grid(model, torch.randn(1, 3, 32, 32)).shape == (1, 128, 4, 4)


def test_feature_grid_equals_torchvision_forward_before_pooling():
    torch.manual_seed(0)
    model = create_resnet("resnet-tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    grid = feature_grid(model, x)
    logits = model.fc(grid.mean((2, 3)))  # avg-pool + fc: exactly torchvision's ResNet.forward
    torch.testing.assert_close(logits, model(x))


def test_tiny_overrides_and_errors():
    model = create_resnet("resnet-tiny", widths=[8, 16, 16, 24], strides=[1, 2, 2, 2], zero_init_residual=True)
    info = resnet_info(model)
    assert (info.output_stride, info.feature_dim) == (16, 24)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    bottleneck = create_resnet("resnet-tiny", block="bottleneck", widths=(8, 8, 8, 16))
    assert resnet_info(bottleneck).feature_dim == 64  # Bottleneck expansion 4
    with pytest.raises(ConfigError, match="block"):
        create_resnet("resnet-tiny", block="wide")
    with pytest.raises(ConfigError, match="unknown option"):
        create_resnet("resnet-tiny", depth=3)
    with pytest.raises(ConfigError, match="unknown option"):
        create_resnet("resnet50", drop_path_rate=0.1)
    with pytest.raises(ConfigError, match="resnet-tiny"):
        create_resnet("resnet18")
    assert set(RESNET_ARCHS) == {"resnet50", "resnet-tiny"}
