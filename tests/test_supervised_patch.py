"""The supervised reference's patch target: each view's label map is cropped and flipped with its image and
reduced to the majority class of each patch, the head learns patch classes where they are learnable, and the
pretrain and convert stages export the backbone without the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO
from PIL import Image

from densessl.checkpoints.io import load_backbone
from densessl.config import load_config
from densessl.data.imagenet import pretraining_images
from densessl.errors import ConfigError, DataError
from densessl.methods import get_method
from densessl.methods.base import build_dataclass
from densessl.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from densessl.stages.convert import run_convert
from densessl.stages.data import run_data
from densessl.stages.pretrain import run_pretrain
from densessl.train.trainer import TrainConfig, Trainer

PATCH = {"target": "patch", "num_classes": 16, "crop_size": 16, "crop_scale": (1.0, 1.0)}


def _constructed() -> tuple[Image.Image, np.ndarray]:
    """16x16 map, 8 px patches, majority counted by hand:
    top-left 40 px of 3 + 24 px of 5 -> 3 | top-right all 7 -> 7
    bottom-left 32 px of 4 + 32 px of 2 (tie) -> 2 | bottom-right 40 px unlabelled (0) + 24 px of 9 -> 0.
    The image's red channel is 20 x the pixel's class, so the crop of the image can be checked against the map."""
    labels = np.zeros((16, 16), dtype=np.uint8)
    labels[0:5, 0:8], labels[5:8, 0:8] = 3, 5
    labels[0:8, 8:16] = 7
    labels[8:12, 0:8], labels[12:16, 0:8] = 4, 2
    labels[13:16, 8:16] = 9
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[..., 0] = labels * 20
    return Image.fromarray(pixels), labels


def _red(view: dict) -> torch.Tensor:
    """The view's red channel back in 0..255."""
    return (view["image"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255


@pytest.mark.parametrize(("flip", "expected"), [(0.0, [[3, 7], [2, 0]]), (1.0, [[7, 3], [0, 2]])])
def test_patch_labels_of_a_constructed_map(flip, expected):
    method = get_method("supervised")("vit-tiny-p8", {**PATCH, "flip_prob": flip}, epochs=1)
    image, labels = _constructed()
    view = method.views()((image, labels))
    assert view["labels"].tolist() == expected
    # the image went through the same crop and flip as its map
    mirrored = labels[:, ::-1] if flip else labels
    torch.testing.assert_close(_red(view), torch.from_numpy(mirrored * 20.0).float(), atol=1.0, rtol=0)


def test_an_upsampling_crop_keeps_image_and_map_aligned():
    """An 8x8 map cropped to 16 px: every source pixel becomes a 2x2 block, so each 8 px patch is a 4x4 quarter
    of the source (nearest for the map: no class is invented at a border)."""
    method = get_method("supervised")("vit-tiny-p8", {**PATCH, "flip_prob": 0.0}, epochs=1)
    labels = np.array([[1] * 4 + [2] * 4] * 4 + [[3] * 4 + [4] * 4] * 4, dtype=np.uint8)
    view = method.views()((Image.fromarray(np.stack([labels * 20] * 3, axis=-1)), labels))
    assert view["labels"].tolist() == [[1, 2], [3, 4]]


def test_the_loss_is_cross_entropy_over_the_labelled_patches():
    torch.manual_seed(0)
    method = get_method("supervised")("vit-tiny-p8", {**PATCH, "label_smoothing": 0.0}, epochs=1)
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[[3, 0], [2, 0]], [[0, 0], [0, 5]]])
    loss, logs = method.loss({"image": images, "labels": labels}, epoch=0)
    logits = method.student(images)  # (2, 4 patches, 16 classes), patches row-major
    picked = torch.stack([logits[0, 0], logits[0, 2], logits[1, 3]])
    torch.testing.assert_close(loss, F.cross_entropy(picked, torch.tensor([3, 2, 5])))
    assert logs["labelled_patches"] == pytest.approx(3 / 8)


def _patch_scene(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """32x32, a 4x4 grid of 8 px patches, each of class 1..3 whose colour channel (class - 1) dominates."""
    classes = rng.integers(1, 4, size=(4, 4))
    labels = np.kron(classes, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    pixels = rng.random((32, 32, 3)) * 0.5
    for c in (1, 2, 3):
        pixels[..., c - 1] += 0.5 * (labels == c)
    return Image.fromarray((pixels * 255).astype("uint8")), labels


def test_learns_patch_classes_that_are_learnable(tmp_path):
    rng = np.random.default_rng(0)
    data = [_patch_scene(rng) for _ in range(96)]
    method = get_method("supervised")("vit-tiny-p8", {"target": "patch", "num_classes": 4, "crop_size": 32,
                                                       "crop_scale": (1.0, 1.0)}, epochs=4)
    train = build_dataclass(TrainConfig, {"epochs": 4, "batch_size_per_gpu": 16, "lr": 0.016, "warmup_epochs": 1,
                                          "weight_decay": 0.05, "weight_decay_end": 0.05, "clip_grad": 0,
                                          "num_workers": 0, "tensorboard": False, "precision": "fp32"}, "test")
    Trainer(method, data, train, tmp_path).fit()
    test_rng = np.random.default_rng(100)
    views = [method.views()(_patch_scene(test_rng)) for _ in range(30)]
    method.eval()
    with torch.no_grad():
        predicted = method.student(torch.stack([v["image"] for v in views])).argmax(dim=-1)
    truth = torch.stack([v["labels"] for v in views]).flatten(1)
    accuracy = (predicted == truth).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 1/3


def _tiny(tmp_path, reference):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "smoke", "results_dir": str(tmp_path / "results"), "runs": [], "data": {"synthetic_size": "tiny"},
        "baselines": {"supervised_reference": [reference]},
        "pretrain": {"supervised": {"train": {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0},
                                    "arch": {"vit-tiny-p8": {"train": {"epochs": 1, "batch_size_per_gpu": 4}}}}}}))
    return load_config([path], root=REPO)


def test_pretrain_and_convert_of_the_dense_reference_drop_the_head(tmp_path):
    cfg = _tiny(tmp_path, {"arch": "vit-tiny-p8", "data": "coco"})
    run_data(cfg, "coco")
    run_id = "supervised/vit-tiny-p8-coco"
    state = torch.load(run_pretrain(cfg, run_id), weights_only=True)
    model, meta = load_backbone(run_convert(cfg, run_id))
    # the patch head: COCO-Stuff's 183 classes on each token of the backbone's width
    assert state["student"]["classifier.weight"].shape == (183, model.embed_dim)
    assert not any("classifier" in k for k in model.state_dict())
    assert meta["run"] == run_id and meta["source"]["kind"] == "pretrained"
    trained = {k.removeprefix("backbone."): v for k, v in state["student"].items() if k.startswith("backbone.")}
    assert model.state_dict().keys() == trained.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


def test_a_target_its_data_has_no_labels_for_is_named(tmp_path):
    with pytest.raises(ConfigError, match="the supervised target is 'patch', but imagenet has image-level labels"):
        _tiny(tmp_path, {"arch": "vit-tiny-p8", "data": "imagenet"})
    with pytest.raises(DataError, match="only coco has the label maps of the patch target"):
        pretraining_images("imagenet", tmp_path, labels="patch")
    with pytest.raises(ConfigError, match="target: 'pixel'; allowed values: image, patch"):
        get_method("supervised")("vit-tiny-p8", {"target": "pixel"}, epochs=1)
    with pytest.raises(ConfigError, match="crop_size: 20 is not a multiple of vit-tiny-p8's patch size 8"):
        get_method("supervised")("vit-tiny-p8", {"target": "patch", "crop_size": 20}, epochs=1)


def test_a_resnet_labels_each_output_cell():
    """ResNet: one label per output cell, the cell's side being the output stride, in the logits' order."""
    torch.manual_seed(0)
    method = get_method("supervised")("resnet-tiny", {"target": "patch", "num_classes": 16, "crop_size": 64,
                                                      "crop_scale": (1.0, 1.0), "flip_prob": 0.0}, epochs=1)
    stride = method.student.patch_size
    labels = np.kron(np.arange(64 // stride).reshape(-1, 1) % 4 + 1, np.ones((stride, 64), np.int64)).astype(np.uint8)
    view = method.views()((Image.fromarray(np.stack([labels * 20] * 3, axis=-1)), labels))
    assert view["labels"].shape == (64 // stride, 64 // stride)
    assert view["labels"][:, 0].tolist() == [r % 4 + 1 for r in range(64 // stride)]
    logits = method.student(view["image"][None])
    assert logits.shape == (1, (64 // stride) ** 2, 16)
    loss, _ = method.loss({"image": view["image"][None], "labels": view["labels"][None]}, epoch=0)
    assert torch.isfinite(loss)
