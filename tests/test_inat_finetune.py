"""iNat 2019 fine-tuning: metrics, layer decay, schedule, loader, mixup targets and a 2-iteration run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.inat import INat2019
from densessl.data.synthetic import synthesize
from densessl.errors import ConfigError, DataError
from densessl.evaluate.inat_finetune import (
    InatClassifier,
    InatFinetuneConfig,
    build_mixup,
    eval_transform,
    lr_at,
    param_groups_layer_decay,
    posterize_zero_bits,
    prepare_backbone,
    run_inat_finetune,
    topk_accuracy,
    train_transform,
)
from densessl.models.backbones import create_backbone

# ---------------------------------------------------------------- metrics


def test_topk_accuracy_hand_computed() -> None:
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # target 0: rank 1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 2: rank 5 (0.7 0.6 0.5 0.4 0.3)
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 1: rank 6
        [0.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0],  # target 4: rank 2
    ])
    targets = torch.tensor([0, 2, 1, 4])
    top1, top5 = topk_accuracy(logits, targets, (1, 5))
    assert top1 == pytest.approx(25.0)  # 1 of 4
    assert top5 == pytest.approx(75.0)  # 3 of 4
    # fewer classes than k: k is clipped, so every sample is a top-5 hit
    top1, top5 = topk_accuracy(logits[:, :3], torch.tensor([0, 2, 1, 1]), (1, 5))
    assert (top1, top5) == (pytest.approx(50.0), pytest.approx(100.0))


# ---------------------------------------------------------------- layer decay and schedule


def test_layer_decay_scales_per_block() -> None:
    backbone = create_backbone("vit-tiny-p8")  # depth 4 -> num_layers 5
    model = InatClassifier(prepare_backbone(backbone, InatFinetuneConfig(input_size=64)), num_classes=8)
    groups = param_groups_layer_decay(model.backbone, model.head, weight_decay=0.05, layer_decay=0.65)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # decay ** (depth + 1 - layer_id), depth = 4
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(0.65 ** 5)
    assert scale_of["cls_token"] == pytest.approx(0.1160290625)  # 0.65^5
    assert scale_of["pos_embed"] == pytest.approx(0.1160290625)
    assert scale_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.17850625)  # 0.65^4
    assert scale_of["blocks.1.mlp.fc1.bias"] == pytest.approx(0.274625)  # 0.65^3
    assert scale_of["blocks.2.norm1.weight"] == pytest.approx(0.4225)  # 0.65^2
    assert scale_of["blocks.3.mlp.fc2.weight"] == pytest.approx(0.65)
    assert scale_of["head.1.weight"] == 1.0 and scale_of["head.0.weight"] == 1.0
    assert "norm.weight" not in scale_of  # final norm removed (official forward skips it)
    # no weight decay on 1-D parameters and on pos_embed / cls_token
    assert wd_of["cls_token"] == 0.0 and wd_of["pos_embed"] == 0.0 and wd_of["blocks.0.attn.qkv.bias"] == 0.0
    assert wd_of["blocks.0.attn.qkv.weight"] == 0.05 and wd_of["head.1.weight"] == 0.05
    assert wd_of["head.0.weight"] == 0.0
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())


def test_lr_schedule_warmup_and_cosine() -> None:
    assert lr_at(0.0, 1.0, 0.0, 5, 10) == 0.0
    assert lr_at(2.5, 1.0, 0.0, 5, 10) == pytest.approx(0.5)
    assert lr_at(5.0, 1.0, 0.1, 5, 10) == pytest.approx(1.0)
    assert lr_at(7.5, 1.0, 0.1, 5, 10) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi/2) = 0
    assert lr_at(10.0, 1.0, 0.1, 5, 10) == pytest.approx(0.1)


def test_blr_rule_only_in_blr_mode() -> None:
    assert InatFinetuneConfig().peak_lr() == pytest.approx(1.4e-4)
    assert InatFinetuneConfig(lr_mode="blr").peak_lr() == pytest.approx(5e-4 * 1024 / 256)


def test_head_init_quirk() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit-tiny-p8")
    quirk = InatClassifier(backbone, 8, head_norm_init_quirk=True)
    plain = InatClassifier(backbone, 8, head_norm_init_quirk=False)
    assert quirk.head[0].weight.abs().max() < 1e-4  # LayerNorm gain re-drawn with std 2e-5
    assert torch.equal(plain.head[0].weight, torch.ones(128))
    assert plain.head[1].weight.std() < 1e-4 and torch.equal(plain.head[1].bias, torch.zeros(8))


def test_pooling_follows_official_forward() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit-tiny-p8")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = backbone.blocks(backbone._pos_embed(backbone.patch_embed(x)))  # before the final norm
        gtsa = InatClassifier(prepare_backbone(backbone, InatFinetuneConfig(input_size=64, drop_path=0.0)), 8).eval()
        assert torch.allclose(gtsa.features(x), tokens[:, 1:].mean(1), atol=1e-5)  # x[:, 1:].mean(1), no norm
        cfg = InatFinetuneConfig(input_size=64, drop_path=0.0, final_norm=True)
        cls = InatClassifier(prepare_backbone(backbone, cfg), 8, pool="cls").eval()
        assert torch.allclose(cls.features(x), backbone.norm(tokens)[:, 0], atol=1e-5)


# ---------------------------------------------------------------- loader


def write_layout(root: Path, n: int = 3, drop_field: str | None = None) -> Path:
    cats = [{"id": i, "name": f"species {i}"} for i in range(3)]
    for split, json_name in (("train", "train2019.json"), ("val", "val2019.json")):
        images, anns = [], []
        for i in range(n):
            rel = f"train_val2019/Plants/{i % 3}/{split}_{i}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / rel)
            images.append({"id": 100 + i, "file_name": rel, "height": 20, "width": 30})
            anns.append({"id": 100 + i, "image_id": 100 + i, "category_id": (2 * i) % 3})
        anns.reverse()  # paired by image_id, not by position
        if drop_field:
            del anns[0][drop_field]
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / json_name).write_text(json.dumps(doc))
    return root


def test_loader_reads_written_layout(tmp_path: Path) -> None:
    ds = INat2019(write_layout(tmp_path), "val")
    assert len(ds) == 3 and ds.num_classes == 3
    assert ds.labels == [0, 2, 1]
    image, label = ds[1]
    assert image.size == (30, 20) and image.mode == "RGB" and label == 2
    assert len(INat2019(tmp_path, "train", max_items=2)) == 2


def test_loader_errors_name_field_and_file(tmp_path: Path) -> None:
    write_layout(tmp_path / "a", drop_field="category_id")
    with pytest.raises(DataError, match=r"train2019\.json.*annotations\[0\].*'category_id'"):
        INat2019(tmp_path / "a", "train")
    write_layout(tmp_path / "b")
    (tmp_path / "b" / "val2019.json").unlink()
    with pytest.raises(DataError, match=r"val2019\.json: annotation file not found"):
        INat2019(tmp_path / "b", "val")
    write_layout(tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "train2019.json").read_text())
    del doc["categories"]
    (tmp_path / "c" / "train2019.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="no field 'categories'"):
        INat2019(tmp_path / "c", "train")
    write_layout(tmp_path / "d")
    (tmp_path / "d" / "train_val2019/Plants/0/train_0.jpg").unlink()
    with pytest.raises(DataError, match=r"train_0\.jpg: image not found"):
        INat2019(tmp_path / "d", "train")


# ---------------------------------------------------------------- augmentation and mixup


def test_mixup_targets_sum_to_one() -> None:
    np.random.seed(0)
    mixup = build_mixup(InatFinetuneConfig(), num_classes=10)
    assert mixup is not None
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8)
    for _ in range(4):  # both mixup and cutmix branches (switch prob 0.5)
        _, soft = mixup(x.clone(), y)
        assert soft.shape == (8, 10)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        assert soft.min() >= 0.1 / 10 * 0.999  # label smoothing 0.1: every class keeps >= 0.01


def test_posterize_zero_bits_is_black() -> None:
    img = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    assert np.asarray(posterize_zero_bits(img, 0)).max() == 0
    assert np.asarray(posterize_zero_bits(img, 1)).max() == 128  # 200 & 0b10000000
    assert posterize_zero_bits(img, 8) is img


def test_transforms_shapes() -> None:
    cfg = InatFinetuneConfig(input_size=32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert train_transform(cfg, (0.5,) * 3, (0.5,) * 3)(img).shape == (3, 32, 32)
    assert eval_transform(cfg, (0.5,) * 3, (0.5,) * 3)(img).shape == (3, 32, 32)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="pool"):
        InatFinetuneConfig(pool="max").validate()
    with pytest.raises(ConfigError, match="even micro-batch"):
        InatFinetuneConfig(batch_size=6, accum_iter=2).validate()


# ---------------------------------------------------------------- end to end


def test_two_iteration_run_on_synthetic_layout(tmp_path: Path) -> None:
    root = tmp_path / "inat"
    synthesize("inat", root, "tiny", seed=0)  # 8 train, 8 val images, 8 classes
    backbone = create_backbone("vit-tiny-p8")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = InatFinetuneConfig(input_size=64, batch_size=4, epochs=1, warmup_epochs=0.5, lr=1e-3, num_workers=0,
                             eval_batch_size=8)
    out = run_inat_finetune(backbone, root, cfg, out_dir=tmp_path / "out")
    d = out["details"]
    assert d["updates"] == 2 and d["num_train"] == 8 and d["num_val"] == 8 and d["num_classes"] == 8
    assert 0.0 <= out["top1"] <= out["top5"] <= 100.0
    assert math.isfinite(out["top1"]) and math.isfinite(d["epochs"][0]["train_loss"])
    # every val image counted once: accuracies are multiples of 100 / 8
    assert (out["top1"] * 8 / 100) == pytest.approx(round(out["top1"] * 8 / 100))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # caller's copy untouched
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["top1"] == pytest.approx(out["top1"])
