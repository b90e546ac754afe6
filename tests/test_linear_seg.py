"""Segmenter linear decoder: mmseg-style transforms, sliding-window inference and a tiny end-to-end run."""

from __future__ import annotations

import colorsys
import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.errors import ConfigError
from densessl.evaluate import linear_seg, resume
from densessl.evaluate.linear_seg import (
    LinearSegConfig,
    LinearSegmenter,
    hsv_to_rgb,
    pad_to,
    photometric_distortion,
    poly_lr,
    random_crop,
    rescale_size,
    rgb_to_hsv,
    run_linear_seg,
    set_drop_path,
    slide_inference,
)
from densessl.models.backbones import as_token_backbone, create_backbone
from densessl.train.trainer import Preempted

COLOURS = {0: (128, 128, 128), 1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 220)}


def write_ade(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0, p: int = 8) -> Path:
    """ADEChallengeData2016 fixture: images of a few sizes, each 8x8 block one colour = one class (0..3)."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    sizes = ((64, 80), (72, 64), (64, 64), (96, 68))
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            ids = rng.choice([0, 1, 2, 3], size=(-(-h // p), -(-w // p)), p=[0.1, 0.3, 0.3, 0.3])
            lab = np.kron(ids, np.ones((p, p), dtype=np.int64))[:h, :w].astype(np.uint8)
            img = np.zeros((h, w, 3), np.uint8)
            for k, c in COLOURS.items():
                img[lab == k] = c
            Image.fromarray(img).save(base / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            Image.fromarray(lab).save(base / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ade(tmp_path_factory.mktemp("ade"))


def smoke_cfg(**kw: object) -> LinearSegConfig:
    base: dict[str, object] = {"crop_size": 64, "base_scale": (128, 64), "iterations": 40, "batch_size": 4,
                               "lr": 0.01, "eval_window": 64, "eval_stride": 64}
    base.update(kw)
    return LinearSegConfig(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- transforms


def test_rescale_size_matches_mmcv_rounding() -> None:
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(500, 375, (2048, 512)) == (683, 512)  # factor 512/375, int(x + 0.5)
    assert rescale_size(3000, 500, (2048, 512)) == (2048, 341)  # long edge binds
    assert rescale_size(80, 64, (128, 64)) == (80, 64)


def test_random_crop_respects_cat_max_ratio() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(64, 64, dtype=torch.long)
    labels[:, 48:] = 1  # only crops that include x >= 48 have a second class
    labels[:4, :] = 255  # ignored pixels are not counted
    img = torch.arange(64.0).expand(3, 64, 64)
    for _ in range(20):
        ci, cl = random_crop(img, labels, 32, 0.75)
        assert ci.shape == (3, 32, 32) and cl.shape == (32, 32)
        valid = cl[cl != 255]
        share = torch.bincount(valid).max().item() / valid.numel()
        assert share < 0.75 or len(valid.unique()) == 1  # the 11th draw is kept after 10 rejections
        assert torch.equal(ci[0], ci[0, :1].expand(32, 32))  # image and labels cropped together
    one_class = torch.zeros(16, 16, dtype=torch.long)
    _, cl = random_crop(torch.zeros(3, 16, 16), one_class, 8, 0.75)  # impossible: falls back, no error
    assert cl.shape == (8, 8)


def test_pad_to_fills_ignore() -> None:
    img, lab = pad_to(torch.ones(3, 5, 7), torch.zeros(5, 7, dtype=torch.long), 8)
    assert img.shape == (3, 8, 8) and lab.shape == (8, 8)
    assert (img[:, 5:, :] == 0).all() and (lab[5:, :] == 255).all() and (lab[:, 7] == 255).all()
    assert (lab[:5, :7] == 0).all()


def test_hsv_roundtrip_and_opencv_scale() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 8, 8)).float()
    hsv = rgb_to_hsv(x)
    r, g, b = (x[:, 2, 3] / 255).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    assert hsv[0, 2, 3].item() == pytest.approx(h * 180, abs=1e-3)  # OpenCV 8-bit hue range 0..180
    assert hsv[1, 2, 3].item() == pytest.approx(s * 255, abs=1e-3)
    assert hsv[2, 2, 3].item() == pytest.approx(v * 255, abs=1e-3)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-3)


def test_photometric_distortion_stays_in_range() -> None:
    torch.manual_seed(1)
    x = torch.randint(0, 256, (3, 16, 16)).float()
    changed = 0
    for _ in range(10):
        y = photometric_distortion(x.clone())
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255
        changed += int(not torch.equal(x, y))
    assert changed >= 5


def test_poly_lr() -> None:
    assert poly_lr(0, 100, 1e-3, 1e-5, 0.9) == pytest.approx(1e-3)
    assert poly_lr(100, 100, 1e-3, 1e-5, 0.9) == pytest.approx(1e-5)
    assert poly_lr(50, 100, 1e-3, 1e-5, 0.9) == pytest.approx((1e-3 - 1e-5) * 0.5 ** 0.9 + 1e-5)


# ---------------------------------------------------------------- sliding window and model


def test_slide_inference_windows_and_averaging() -> None:
    calls: list[tuple[int, ...]] = []

    def fwd(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x[:, :1].repeat(1, 2, 1, 1)  # logits = the first input channel: averaging must recover it

    img = torch.rand(1, 3, 64, 80)
    out = slide_inference(fwd, img, window=64, stride=64, num_classes=2)
    assert calls == [(2, 3, 64, 64)]  # two windows: x in [0, 64) and [16, 80), forwarded together
    assert torch.allclose(out[0, 0], img[0, 0]) and torch.allclose(out[0, 1], img[0, 0])

    calls.clear()
    out = slide_inference(fwd, torch.rand(1, 3, 40, 100), window=32, stride=24, num_classes=2, batch_size=1)
    # h_grids = (40-32+23)//24+1 = 2, w_grids = (100-32+23)//24+1 = 4 -> 8 windows of 32x32
    assert calls == [(1, 3, 32, 32)] * 8 and out.shape == (1, 2, 40, 100)
    small = slide_inference(lambda x: x[:, :1], torch.rand(1, 3, 16, 24), window=32, stride=32, num_classes=1)
    assert small.shape == (1, 1, 16, 24)  # a window shrinks to an image smaller than it


def test_slide_inference_counts_overlaps() -> None:
    n = {"i": 0}

    def fwd(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 1, *x.shape[-2:])
        for k in range(x.shape[0]):
            n["i"] += 1
            out[k] = float(n["i"])  # window k (1-based, row-major) predicts k everywhere
        return out

    out = slide_inference(fwd, torch.zeros(1, 3, 8, 12), window=8, stride=4, num_classes=1, batch_size=8)
    # windows at x = 0 and 4 -> value 1 on [0,4), mean(1,2) on [4,8), 2 on [8,12)
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0] * 4 + [1.5] * 4 + [2.0] * 4))


def test_linear_segmenter_any_size_and_prefix_dropped() -> None:
    torch.manual_seed(0)
    model = LinearSegmenter(create_backbone("vit-tiny-p8"), 5).eval()
    out = model(torch.randn(2, 3, 36, 50))  # not multiples of 8: padded, then cropped back
    assert out.shape == (2, 5, 36, 50)
    assert model.num_prefix_tokens == 1


# ---------------------------------------------------------------- end to end


def test_run_linear_seg_end_to_end(ade_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit-tiny-p8")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    r = run_linear_seg(backbone, ade_root, smoke_cfg(), out_dir=tmp_path)
    for k in ("mIoU", "mAcc", "aAcc"):
        assert 0.0 <= r[k] <= 100.0
    assert len(r["per_class_IoU"]) == 150 and r["num_val"] == 4 and r["num_train"] == 8
    iou = np.array(r["per_class_IoU"], dtype=float)
    assert np.isnan(iou[3:]).all()  # only ADE ids 1..3 (-> 0..2) exist; 0 = other is ignored
    assert r["mIoU"] == pytest.approx(float(np.nanmean(iou)))
    assert r["train_loss"][-1]["loss"] < r["train_loss"][0]["loss"]
    assert r["mIoU"] > 60  # colour = class: even a short fine-tune must separate them
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # caller's copy untouched
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["per_class_IoU"][149] is None and on_disk["mIoU"] == pytest.approx(r["mIoU"])


def test_run_linear_seg_frozen_backbone(ade_root: Path) -> None:
    torch.manual_seed(0)
    r = run_linear_seg(create_backbone("vit-tiny-p8"), ade_root,
                       smoke_cfg(iterations=10, finetune_backbone=False, lr=0.05, max_val_items=2))
    assert r["num_val"] == 2 and 0 <= r["mIoU"] <= 100


def test_resnet_fine_tunes_with_the_vit_drop_path_setting(ade_root: Path) -> None:
    """The paper preset's drop_path 0.1 is Segmenter's ViT setting; CLoVE's ResNet rows have no stochastic depth,
    so they fine-tune without it (and say so) instead of failing the whole paper DAG."""
    torch.manual_seed(0)
    resnet = as_token_backbone(create_backbone("resnet-tiny"))
    r = run_linear_seg(resnet, ade_root, smoke_cfg(iterations=4, drop_path=0.1, max_val_items=1))
    assert r["drop_path_applied"] == 0.0 and 0 <= r["mIoU"] <= 100
    vit = run_linear_seg(create_backbone("vit-tiny-p8"), ade_root, smoke_cfg(iterations=2, drop_path=0.1,
                                                                              max_val_items=1))
    assert vit["drop_path_applied"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="drop_path: 0"):
        set_drop_path(torch.nn.Linear(2, 2), 0.1)  # anything else without blocks is refused by name


def test_run_linear_seg_rejects_too_few_images(ade_root: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        run_linear_seg(create_backbone("vit-tiny-p8"), ade_root, smoke_cfg(batch_size=16))


class _ColourClassifier(torch.nn.Module):
    """Per-pixel 'model': the fixture's class from the pixel colour. It is flip-equivariant, so on the
    fixture's asymmetric images a flipped view whose logits are not flipped back scores worse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        logits = torch.full((x.shape[0], 150, *x.shape[-2:]), -1e3)
        for k in (1, 2, 3):  # ids 1..3 → reduced labels 0..2 (reduce_zero_label)
            colour = torch.tensor(COLOURS[k], dtype=x.dtype).view(1, 3, 1, 1) / 255.0
            logits[:, k - 1] = -((img - colour) ** 2).sum(1)
        return logits


def test_multiscale_flip_undoes_the_flip(ade_root: Path) -> None:
    from densessl.data.ade20k import ADE20KSegmentation
    from densessl.evaluate.linear_seg import ADE20KVal, evaluate_linear_seg

    cfg = smoke_cfg(eval_ms_flip=True, eval_ms_ratios=(1.0,), num_workers=0)
    reader = ADE20KSegmentation(ade_root, "val")
    data = ADE20KVal(reader, cfg.base_scale, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), cfg.eval_ms_ratios)
    out = evaluate_linear_seg(_ColourClassifier(), data, cfg, torch.device("cpu"), lambda: torch.no_grad())
    # a per-pixel model at ratio 1.0: single scale and flip-averaged must agree exactly
    assert out["mIoU"] > 90.0
    assert out["ms_flip"]["mIoU"] == pytest.approx(out["mIoU"])
    assert out["ms_flip"]["ratios"] == [1.0]


# ---------------------------------------------------------------- resume


def _preempt_at_iteration(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """SIGTERM to this process while iteration ``iteration`` (0-based) runs, as SLURM does before a requeue."""
    real = linear_seg.poly_lr

    def lr_then_signal(step: int, *args: float) -> float:
        if step == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(linear_seg, "poly_lr", lr_then_signal)


def _record_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Iterations at which the training state gets written."""
    saves: list[int] = []
    real = resume.TrainState.save

    def save(self: resume.TrainState, state: dict) -> None:
        saves.append(state["progress"]["step"])
        real(self, state)

    monkeypatch.setattr(resume.TrainState, "save", save)
    return saves


def _outcome(r: dict) -> str:
    """Loss curve and metrics as text: exact float reprs, and NaN (absent classes) compares equal to NaN."""
    return json.dumps([r["train_loss"], r["mIoU"], r["mAcc"], r["aAcc"], r["per_class_IoU"], r["per_class_Acc"]])


@pytest.mark.usefixtures("sigterm_guard")
def test_preempted_run_resumes_exactly(ade_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"iterations": 6, "checkpoint_every": 2, "max_val_items": 2}  # 2 batches per epoch: resume crosses epochs
    backbone = create_backbone("vit-tiny-p8")
    full = run_linear_seg(backbone, ade_root, smoke_cfg(**cfg))  # drop-path 0.1 and SGD momentum both matter
    state = tmp_path / "train_state.pt"
    handler = signal.getsignal(signal.SIGTERM)
    saves = _record_saves(monkeypatch)
    with monkeypatch.context() as m:
        _preempt_at_iteration(m, 2)
        with pytest.raises(Preempted, match=r"after iteration 3/6"):
            run_linear_seg(backbone, ade_root, smoke_cfg(**cfg), state_path=state)
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers only while training
    assert saves == [2, 3]  # periodic (checkpoint_every=2), then on the signal
    assert torch.load(state, weights_only=True)["progress"]["step"] == 3
    cfg["checkpoint_every"] = 5  # a field that does not change the run may differ between attempts
    resumed = run_linear_seg(backbone, ade_root, smoke_cfg(**cfg), state_path=state)
    assert _outcome(resumed) == _outcome(full)
    assert len(resumed["train_loss"]) == 6
    assert not state.exists()  # deleted once the metrics exist


@pytest.mark.usefixtures("sigterm_guard")
def test_state_of_another_run_is_ignored(ade_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    backbone = create_backbone("vit-tiny-p8")
    state = tmp_path / "train_state.pt"
    with monkeypatch.context() as m:
        _preempt_at_iteration(m, 1)
        with pytest.raises(Preempted):
            run_linear_seg(backbone, ade_root, smoke_cfg(iterations=4, max_val_items=1), state_path=state)
    other = smoke_cfg(iterations=4, max_val_items=1, lr=0.02)
    with caplog.at_level(logging.WARNING, logger="densessl.evaluate.resume"):
        r = run_linear_seg(backbone, ade_root, other, state_path=state)
    assert "different run (config differ)" in caplog.text
    assert _outcome(r) == _outcome(run_linear_seg(backbone, ade_root, other))  # trained from the start
    assert not state.exists()
    stranger = create_backbone("vit-tiny-p8")  # same architecture, other weights
    ident = resume.TrainState(state, "linear_seg", other, backbone).identity
    assert resume.TrainState(state, "linear_seg", other, stranger).identity["backbone"] != ident["backbone"]
    assert resume.TrainState(state, "linear_seg", smoke_cfg(iterations=4, max_val_items=1, lr=0.02,
                                                                num_workers=2), backbone).identity == ident


def test_worker_processes_do_not_change_the_run(ade_root: Path) -> None:
    backbone = create_backbone("vit-tiny-p8")
    cfg = {"iterations": 3, "max_val_items": 1}
    in_process = run_linear_seg(backbone, ade_root, smoke_cfg(num_workers=0, **cfg))
    workers = run_linear_seg(backbone, ade_root, smoke_cfg(num_workers=2, **cfg))
    assert _outcome(workers) == _outcome(in_process)


@pytest.mark.usefixtures("sigterm_guard")
def test_evaluate_stage_keeps_the_state_next_to_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage passes ``state_path`` (in the metrics folder), so a requeued job continues the same run."""
    from densessl.config import load_config
    from densessl.stages.convert import run_convert
    from densessl.stages.data import run_data
    from densessl.stages.evaluate import TRAIN_STATE_NAME, run_evaluate

    def stage_cfg(results: Path):  # noqa: ANN202
        path = tmp_path / f"{results.name}.yaml"
        path.write_text(json.dumps({"results_dir": str(results), "data": {"synthetic_size": "tiny"},
                                    "evaluate": {"linear_seg": {"iterations": 4, "batch_size": 2,
                                                                "checkpoint_every": 2}}}))
        cfg = load_config([path])
        run_data(cfg, "ade20k")
        run_convert(cfg, "random-init/vit-tiny-p8-seed1")
        return cfg

    run_id = "random-init/vit-tiny-p8-seed1"
    full = json.loads(run_evaluate(stage_cfg(tmp_path / "a"), "linear_ade20k", run_id, "cpu").read_text())
    cfg = stage_cfg(tmp_path / "b")
    with monkeypatch.context() as m:
        _preempt_at_iteration(m, 0)
        with pytest.raises(Preempted, match="after iteration 1/4"):
            run_evaluate(cfg, "linear_ade20k", run_id, "cpu")
    out = cfg.eval_metrics("linear_ade20k", cfg.run(run_id))
    assert (out.parent / TRAIN_STATE_NAME).is_file() and not out.exists()
    resumed = json.loads(run_evaluate(cfg, "linear_ade20k", run_id, "cpu").read_text())
    assert _outcome(resumed["metrics"]) == _outcome(full["metrics"])
    assert not (out.parent / TRAIN_STATE_NAME).exists()
