"""iNat 2019 fine-tuning: metrics, layer decay, schedule, loader, mixup targets and a 2-iteration run."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.inat import INat2019
from densessl.data.synthetic import synthesize
from densessl.errors import ConfigError, DataError
from densessl.evaluate import inat_finetune
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
from densessl.evaluate.resume import TrainState
from densessl.models.backbones import create_backbone
from densessl.train.trainer import Preempted

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


# ---------------------------------------------------------------- resume


def _resume_cfg(**kw: object) -> InatFinetuneConfig:
    """2 epochs x 4 micro-batches of 2 (accum_iter 2: 2 updates per epoch); mixup, cutmix, RandAugment,
    random erasing and drop-path all on, so every source of randomness has to survive the resume."""
    base: dict[str, object] = {"input_size": 32, "batch_size": 4, "accum_iter": 2, "epochs": 2, "warmup_epochs": 0.5,
                               "lr": 1e-3, "num_workers": 0, "eval_batch_size": 8, "checkpoint_every": 2,
                               "max_train_items": 8, "max_val_items": 4}
    base.update(kw)
    return InatFinetuneConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def inat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inat")
    synthesize("inat", root, "tiny", seed=0)  # 8 train, 8 val images, 8 classes
    return root


def _preempt_at_update(monkeypatch: pytest.MonkeyPatch, update: int) -> None:
    """SIGTERM to this process during update ``update`` (1-based; lr_at is called once per update)."""
    real, calls = inat_finetune.lr_at, {"n": 0}

    def lr_then_signal(*args: float) -> float:
        calls["n"] += 1
        if calls["n"] == update:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(inat_finetune, "lr_at", lr_then_signal)


def _record_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Update counts at which the training state gets written."""
    saves: list[int] = []
    real = TrainState.save

    def save(self: TrainState, state: dict) -> None:
        saves.append(state["progress"]["updates"])
        real(self, state)

    monkeypatch.setattr(TrainState, "save", save)
    return saves


def _outcome(r: dict) -> str:
    d = r["details"]
    return json.dumps([r["top1"], r["top5"], d["final"], d["best"], d["epochs"], d["updates"]])


@pytest.mark.usefixtures("sigterm_guard")
def test_preempted_finetune_resumes_exactly(inat_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = create_backbone("vit-tiny-p8")
    full = run_inat_finetune(backbone, inat_root, _resume_cfg())
    state = tmp_path / "train_state.pt"
    handler = signal.getsignal(signal.SIGTERM)
    saves = _record_saves(monkeypatch)
    with monkeypatch.context() as m:
        _preempt_at_update(m, 3)  # first update of epoch 1, after the periodic save at update 2
        with pytest.raises(Preempted, match=r"after update 3 \(epoch 1, micro-batch 2/4\)"):
            run_inat_finetune(backbone, inat_root, _resume_cfg(), out_dir=tmp_path, state_path=state)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert saves == [2, 3]  # periodic (checkpoint_every=2), then on the signal
    saved = torch.load(state, weights_only=True)
    assert (saved["progress"]["epoch"], saved["progress"]["batch"], saved["progress"]["updates"]) == (1, 2, 3)
    assert len(json.loads((tmp_path / "log.json").read_text())) == 1
    resumed = run_inat_finetune(backbone, inat_root, _resume_cfg(checkpoint_every=3), out_dir=tmp_path,
                                state_path=state)  # a field that does not change the run may differ
    assert _outcome(resumed) == _outcome(full)
    assert resumed["details"]["updates"] == 4 and len(resumed["details"]["epochs"]) == 2
    assert not state.exists()
    assert json.loads((tmp_path / "log.json").read_text()) == resumed["details"]["epochs"]


@pytest.mark.usefixtures("sigterm_guard")
def test_finetune_ignores_state_of_another_config(inat_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    backbone = create_backbone("vit-tiny-p8")
    state = tmp_path / "train_state.pt"
    with monkeypatch.context() as m:
        _preempt_at_update(m, 3)
        with pytest.raises(Preempted):
            run_inat_finetune(backbone, inat_root, _resume_cfg(), state_path=state)
    other = _resume_cfg(mixup=0.0, cutmix=0.0)
    with caplog.at_level(logging.WARNING, logger="densessl.evaluate.resume"):
        r = run_inat_finetune(backbone, inat_root, other, state_path=state)
    assert "different run (config differ)" in caplog.text
    assert _outcome(r) == _outcome(run_inat_finetune(backbone, inat_root, other))
    assert not state.exists()


def test_finetune_workers_do_not_change_the_run(inat_root: Path) -> None:
    backbone = create_backbone("vit-tiny-p8")
    in_process = run_inat_finetune(backbone, inat_root, _resume_cfg(epochs=1))
    workers = run_inat_finetune(backbone, inat_root, _resume_cfg(epochs=1, num_workers=2))
    assert _outcome(workers) == _outcome(in_process)
