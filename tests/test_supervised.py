"""The supervised reference: drawn as the random-init network it is compared with, learns labels where they
are learnable, and runs through the pretrain and convert stages like any method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image

from densessl.checkpoints.io import load_backbone
from densessl.config import Run, load_config
from densessl.data.imagenet import pretraining_images
from densessl.errors import ConfigError, DataError
from densessl.methods import get_method
from densessl.methods.base import build_dataclass
from densessl.stages.convert import random_init_backbone, run_convert
from densessl.stages.data import run_data
from densessl.stages.pretrain import run_pretrain
from densessl.train.trainer import TrainConfig, Trainer


@pytest.mark.parametrize(("arch", "variant"), [("vit-tiny-p8", None), ("resnet-tiny", "clove")])
def test_reference_starts_from_its_random_init_network(arch, variant):
    """Seeded as the pretrain stage seeds, the reference's step-0 backbone is the random-init row of the same
    seed, weight for weight: its margin over that row is what the labels taught."""
    cfg = load_config(preset="smoke", root=REPO)
    settings = cfg.pretrain_settings(Run("supervised", arch, "imagenet", variant=variant))
    torch.manual_seed(0)
    method = get_method("supervised")(arch, settings["method"], epochs=1)
    baseline, arch_kwargs = random_init_backbone(arch, variant, seed=0)
    assert method.arch_kwargs == arch_kwargs
    ours = method.export_backbone().state_dict()
    theirs = baseline.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def _coloured(label: int, rng: np.random.Generator) -> Image.Image:
    """A noisy image whose dominant colour channel is the class (3 classes, answer known)."""
    pixels = rng.random((48, 48, 3)) * 0.5
    pixels[..., label] += 0.5
    return Image.fromarray((pixels * 255).astype("uint8"))


def test_learns_classes_that_are_learnable(tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    data = [(_coloured(i % 3, rng), i % 3) for i in range(96)]
    method = get_method("supervised")("vit-tiny-p8", {"num_classes": 3, "crop_size": 32,
                                                       "crop_scale": (0.5, 1.0)}, epochs=4)
    train = build_dataclass(TrainConfig, {"epochs": 4, "batch_size_per_gpu": 16, "lr": 0.008, "warmup_epochs": 1,
                                          "weight_decay": 0.05, "weight_decay_end": 0.05, "clip_grad": 0,
                                          "num_workers": 0, "tensorboard": False, "precision": "fp32"}, "test")
    Trainer(method, data, train, tmp_path).fit()
    views = method.views()
    test = [_coloured(k % 3, np.random.default_rng(100 + k)) for k in range(30)]
    method.eval()
    with torch.no_grad():
        batch = torch.stack([views((img, 0))["image"] for img in test])
        predicted = method.student(batch).argmax(dim=1)
    accuracy = (predicted == torch.tensor([k % 3 for k in range(30)])).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 1/3


def _tiny(tmp_path, num_classes=8):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"), "runs": [], "data": {"synthetic_size": "tiny"},
        "pretrain": {"supervised": {"method": {"num_classes": num_classes},
                                    "train": {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0}}}}))
    return load_config([path], root=REPO)


def test_pretrain_and_convert_export_the_backbone_without_classifier(tmp_path):
    cfg = _tiny(tmp_path)
    run_data(cfg, "imagenet")
    run_id = "supervised/resnet-tiny.clove-imagenet"
    state = torch.load(run_pretrain(cfg, run_id), weights_only=True)
    assert any(k.startswith("classifier.") for k in state["student"])
    model, meta = load_backbone(run_convert(cfg, run_id))
    assert not any("classifier" in k for k in model.state_dict())
    assert meta["run"] == run_id and meta["source"]["kind"] == "pretrained"
    trained = {k.removeprefix("backbone."): v for k, v in state["student"].items() if k.startswith("backbone.")}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


def test_too_few_classes_and_unlabelled_data_are_named(tmp_path):
    cfg = _tiny(tmp_path, num_classes=4)
    run_data(cfg, "imagenet")
    with pytest.raises(ConfigError, match="8 classes, but pretrain.supervised.method.num_classes is 4"):
        run_pretrain(cfg, "supervised/resnet-tiny.clove-imagenet")
    with pytest.raises(DataError, match="only imagenet has image-level labels"):
        pretraining_images("coco", tmp_path, labels="image")


def test_the_classifier_reads_the_pooled_feature_it_is_told_to():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    method = get_method("supervised")("vit-tiny-p8", {"num_classes": 8, "pool": "avg"}, epochs=1)
    backbone = method.student.backbone
    expected = method.student.classifier(backbone.forward_features(images)[:, backbone.num_prefix_tokens:].mean(1))
    torch.testing.assert_close(method.student(images), expected)
    token = get_method("supervised")("vit-tiny-p8", {"num_classes": 8}, epochs=1)
    cls = token.student.classifier(token.student.backbone.forward_features(images)[:, 0])
    torch.testing.assert_close(token.student(images), cls)
    with pytest.raises(ConfigError, match="pool: 'max'; allowed values: token, avg"):
        get_method("supervised")("vit-tiny-p8", {"num_classes": 8, "pool": "max"}, epochs=1)
