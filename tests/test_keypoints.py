"""COCO keypoint transfer: published settings at both presets, the synthetic keypoint files, one training
iteration + evaluation through the evaluate stage, and exact resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from pycocotools.coco import COCO

from densessl.config import EVALUATIONS, load_config
from densessl.data.synthetic import synthesize
from densessl.data.synthetic.coco_keypoints import KEYPOINT_NAMES, SKELETON, person_keypoints
from densessl.errors import ConfigError
from densessl.evaluate.transfer.keypoints import PROTOCOL, build_model, coco_keypoint_ap, stage_channels
from densessl.evaluate.transfer.keypoints_config import KeypointRCNNConfig
from densessl.evaluate.transfer.keypoints_data import COCO_FLIP_INDEX, KeypointTargets
from densessl.methods.base import build_dataclass
from densessl.models.backbones import create_backbone
from densessl.train.trainer import Preempted


def _settings(preset: str) -> KeypointRCNNConfig:
    cfg = load_config([REPO / "config.yaml"], preset=preset, root=REPO)
    return build_dataclass(KeypointRCNNConfig, cfg.eval_settings(PROTOCOL), "evaluate.keypoints")


def test_paper_settings_are_detectron2_keypoint_rcnn_1x() -> None:
    """detectron2 keypoint_rcnn_R_50_FPN_1x.yaml + Base-Keypoint-RCNN-FPN.yaml + Base-RCNN-FPN.yaml + defaults.py,
    with the PixPro fine-tuning norms (SyncBN, FREEZE_AT 0)."""
    c = _settings("paper")
    assert (c.iterations, c.batch_size, c.lr, c.steps, c.gamma) == (90000, 16, 0.02, (60000, 80000), 0.1)
    assert (c.warmup_iters, c.warmup_factor, c.momentum, c.weight_decay, c.weight_decay_norm) == (
        1000, 0.001, 0.9, 1e-4, 0.0)
    assert c.min_size_train == (640, 672, 704, 736, 768, 800) and c.max_size_train == 1333
    assert (c.min_size_test, c.max_size_test, c.flip_prob) == (800, 1333, 0.5)
    assert (c.norm, c.freeze_at, c.fpn_channels) == ("syncbn", 0, 256)
    assert c.anchor_sizes == (32, 64, 128, 256, 512) and c.aspect_ratios == (0.5, 1.0, 2.0)
    assert (c.rpn_pre_nms_top_n_train, c.rpn_post_nms_top_n_train, c.rpn_post_nms_top_n_test) == (2000, 1500, 1000)
    assert (c.box_batch_size_per_image, c.box_head_dim, c.detections_per_image) == (512, 1024, 100)
    assert c.keypoint_head_channels == (512,) * 8 and c.num_keypoints == 17 and c.min_keypoints_per_image == 1
    # detectron2 WarmupMultiStepLR: linear warm-up from lr/1000, x0.1 at 60k and 80k
    assert c.lr_at(0) == pytest.approx(2e-5)
    assert c.lr_at(500) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert [c.lr_at(i) for i in (1000, 59999, 60000, 80000, 89999)] == pytest.approx([0.02, 0.02, 2e-3, 2e-4, 2e-4])


def test_paper_model_is_keypoint_rcnn_r50_fpn() -> None:
    """The generated detector at paper scale, built without training: FPN on ResNet-50's res2..res5 widths,
    detectron2's RPN/RoI sizes and the eight-conv keypoint head."""
    c = _settings("paper")
    model = build_model(create_backbone("resnet50"), c)
    assert stage_channels(model.backbone.body) == [256, 512, 1024, 2048]
    assert [m.in_channels for m in model.backbone.fpn.inner_blocks.modules() if isinstance(m, torch.nn.Conv2d)] == [
        256, 512, 1024, 2048]
    assert model.rpn._post_nms_top_n == {"training": 1500, "testing": 1000}
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    convs = [m for m in model.roi_heads.keypoint_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [512] * 8
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 17
    assert model.roi_heads.keypoint_roi_pool.output_size == (14, 14)
    assert model.roi_heads.detections_per_img == 100 and model.roi_heads.score_thresh == 0.05
    assert tuple(model.transform.min_size) == (640, 672, 704, 736, 768, 800)
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # FREEZE_AT 0


def test_smoke_settings_and_applicability() -> None:
    c = _settings("smoke")
    assert c.iterations < 1000 and c.fpn_channels < 256
    cfg = load_config([REPO / "config.yaml"], preset="smoke", root=REPO)
    assert PROTOCOL in cfg.evaluations and EVALUATIONS[PROTOCOL]["backbones"] == ("resnet",)
    runs = {r.id for p, r in cfg.evaluation_jobs() if p == PROTOCOL}
    assert runs and all("resnet" in r for r in runs)
    model = build_model(create_backbone("resnet-tiny"), c)
    assert stage_channels(model.backbone.body) == [16, 32, 64, 128]
    with pytest.raises(ConfigError, match="takes a ResNet backbone"):
        build_model(create_backbone("vit-tiny-p8"), c)
    with pytest.raises(ConfigError, match="norm="):
        KeypointRCNNConfig(norm="gn").validate()


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    synthesize("coco", root, "tiny", seed=0)
    return root


def test_keypoint_files_are_coco_format_and_gt_scores_ap_100(coco_root: Path) -> None:
    for split in ("train2017", "val2017"):
        path = coco_root / "annotations" / f"person_keypoints_{split}.json"
        gt = COCO(str(path))
        instances = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in gt.dataset["categories"]] == ["person"]
        cat = gt.dataset["categories"][0]
        assert tuple(cat["keypoints"]) == KEYPOINT_NAMES and [tuple(s) for s in cat["skeleton"]] == list(SKELETON)
        assert gt.dataset["images"] == instances["images"]
        same = {a["id"]: a for a in instances["annotations"]}
        for ann in gt.dataset["annotations"]:
            assert set(ann) == {"segmentation", "num_keypoints", "area", "iscrowd", "keypoints", "image_id", "bbox",
                                "category_id", "id"}
            assert all(ann[k] == same[ann["id"]][k] for k in ("bbox", "area", "segmentation", "iscrowd", "image_id"))
            assert ann["category_id"] == same[ann["id"]]["category_id"] == 1 and len(ann["keypoints"]) == 51
            assert ann["num_keypoints"] == sum(v > 0 for v in ann["keypoints"][2::3])
        results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
                   for a in gt.dataset["annotations"] if a["num_keypoints"] > 0]
        assert results
        ap = coco_keypoint_ap(gt, results)
        assert [ap["AP_kp"], ap["AP_kp50"], ap["AP_kp75"]] == pytest.approx([100.0] * 3, abs=1e-9)
        shifted = [{**r, "keypoints": [v + 3 * (i % 3 != 2) for i, v in enumerate(r["keypoints"])]} for r in results]
        assert coco_keypoint_ap(gt, shifted)["AP_kp"] < 100.0  # the score moves with the keypoints
        assert coco_keypoint_ap(gt, [])["AP_kp"] == 0.0


def test_keypoints_follow_the_image_under_a_flip() -> None:
    """A mirrored person has its left and right joints swapped and mirrored: COCO's flip map holds, so flip
    augmentation trains on consistent labels."""
    yy, xx = np.mgrid[0:40, 0:50]
    full = ((xx - 21.5) / 12) ** 2 + ((yy - 19.5) / 9) ** 2 <= 1
    visible = full & (xx < 26)
    kp = np.array(person_keypoints(full, visible)).reshape(17, 3)
    mirrored = np.array(person_keypoints(full[:, ::-1], visible[:, ::-1])).reshape(17, 3)
    expect = kp[list(COCO_FLIP_INDEX)]
    labelled = expect[:, 2] > 0
    assert np.all(mirrored[:, 2] == expect[:, 2])
    assert np.abs(mirrored[labelled, 0] - (49 - expect[labelled, 0])).max() <= 1
    assert np.abs(mirrored[labelled, 1] - expect[labelled, 1]).max() <= 1
    assert set(kp[:, 2]) == {1, 2}  # occluded joints are labelled 1


def test_dataset_targets_and_training_filter(coco_root: Path) -> None:
    data = KeypointTargets(coco_root, "train", True)
    assert len(data) == 2  # only the images with labelled keypoints
    image, target = data[0]
    assert image.shape[0] == 3 and target["keypoints"].shape[1:] == (17, 3) and (target["labels"] == 1).all()
    flipped = KeypointTargets(coco_root, "train", True, flip_prob=1.0)
    image_f, target_f = flipped[0]
    assert torch.equal(image_f, image.flip(-1))
    w = image.shape[-1]
    assert torch.allclose(target_f["keypoints"][:, 1, 0], w - target["keypoints"][:, 2, 0])
    assert torch.allclose(target_f["boxes"][:, 0], w - target["boxes"][:, 2])


def _stage_cfg(tmp_path: Path, results: Path):  # noqa: ANN202
    from densessl.stages.convert import run_convert
    from densessl.stages.data import run_data

    path = tmp_path / f"{results.name}.yaml"
    path.write_text(json.dumps({
        "results_dir": str(results), "data": {"synthetic_size": "tiny"},
        "runs": [{"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}], "random_init_seeds": [0],
        "evaluations": [PROTOCOL],
        "evaluate": {"keypoints": {"iterations": 3, "batch_size": 2, "checkpoint_every": 2, "warmup_iters": 1,
                                   "steps": [2], "num_workers": 0}}}))
    cfg = load_config([path], root=REPO)
    run_data(cfg, "coco")
    run_convert(cfg, "random-init/resnet-tiny.clove-seed0")
    return cfg


def _outcome(doc: dict) -> str:
    m = dict(doc["metrics"])
    details = m.pop("details")
    return json.dumps([m, details["loss_curve"], details["num_detections"], details["iterations"]])


@pytest.mark.usefixtures("sigterm_guard")
def test_stage_trains_evaluates_and_resumes_after_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from densessl.stages.evaluate import TRAIN_STATE_NAME, run_evaluate

    run_id = "random-init/resnet-tiny.clove-seed0"
    full = json.loads(run_evaluate(_stage_cfg(tmp_path, tmp_path / "a"), PROTOCOL, run_id, "cpu").read_text())
    m = full["metrics"]
    assert {"AP_kp", "AP_kp50", "AP_kp75"} <= set(m) and m["details"]["iterations"] == 3
    assert len(m["details"]["loss_curve"]) == 3 and "loss_keypoint" in m["details"]["loss_curve"][0]
    assert all(0.0 <= m[k] <= 100.0 for k in ("AP_kp", "AP_kp50", "AP_kp75"))

    cfg = _stage_cfg(tmp_path, tmp_path / "b")
    real, calls = KeypointRCNNConfig.lr_at, {"n": 0}

    def lr_then_signal(self: KeypointRCNNConfig, iteration: int) -> float:
        calls["n"] += 1
        if calls["n"] == 2:  # during the second iteration: state saved after it, at 2 of 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, iteration)

    with monkeypatch.context() as mp:
        mp.setattr(KeypointRCNNConfig, "lr_at", lr_then_signal)
        with pytest.raises(Preempted, match="after iteration 2/3"):
            run_evaluate(cfg, PROTOCOL, run_id, "cpu")
    out = cfg.eval_metrics(PROTOCOL, cfg.run(run_id))
    assert (out.parent / TRAIN_STATE_NAME).is_file() and not out.exists()
    resumed = json.loads(run_evaluate(cfg, PROTOCOL, run_id, "cpu").read_text())
    assert _outcome(resumed) == _outcome(full)
    assert not (out.parent / TRAIN_STATE_NAME).exists()


def test_missing_keypoint_file_names_it_and_the_fix(tmp_path: Path) -> None:
    from densessl.errors import DataError

    (tmp_path / "images" / "train2017").mkdir(parents=True)
    with pytest.raises(DataError, match=r"person_keypoints_train2017\.json: COCO keypoint annotations not found"):
        KeypointTargets(tmp_path, "train", True)


def test_report_shows_keypoint_ap_for_the_resnet_rows_only(tmp_path: Path) -> None:
    import yaml

    from densessl.report.build import build_report

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"), "random_init_seeds": [0], "evaluations": [PROTOCOL],
        "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"},
                 {"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}]}))
    cfg = load_config([path], root=REPO)
    for dataset in cfg.datasets:
        manifest = cfg.data_manifest(dataset)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"fingerprint": {"content_sha256": "0" * 64, "listing_sha256": None},
                                        "provenance": {"wall_s": 1.0}}))
    jobs = cfg.evaluation_jobs()
    assert {r.arch for _, r in jobs} == {"resnet-tiny"}
    for protocol, run in jobs:
        out = cfg.eval_metrics(protocol, run)
        out.parent.mkdir(parents=True, exist_ok=True)
        values = {"AP_kp": 4.5 - run.is_random_init, "AP_kp50": 16.0, "AP_kp75": 0.5}
        out.write_text(json.dumps({"metrics": values, "provenance": {"wall_s": 1.0}}))
    report = build_report(cfg).read_text()
    section = report.split(EVALUATIONS[PROTOCOL]["title"])[1].split("\n## ")[0]
    assert "| AP_kp | AP_kp50 | AP_kp75 |" in section and "DINO" not in section
    assert "| CLoVE | ResNet-Tiny (smoke) | ImageNet-1k | 4.50 | 16.00 | 0.50 |" in section
    assert "| random init (seed0) | ResNet-Tiny (smoke), CLoVE init | none | 3.50 |" in section


def test_caffe_style_resnet_keeps_its_strides_and_keys(tmp_path: Path) -> None:
    """MSRA's caffe-style R-50 (arch_kwargs stride_in_1x1, checkpoints/msra.py), loaded as the evaluate stage
    loads it, gives a Keypoint R-CNN body with every backbone key and the stride in each first 1x1 conv."""
    from densessl.checkpoints.io import load_backbone, save_backbone
    from densessl.models.resnet import feature_grid

    torch.manual_seed(0)
    kwargs = {"stride_in_1x1": True}
    out = tmp_path / "backbone.safetensors"
    save_backbone(out, create_backbone("resnet50", **kwargs), "resnet50", kwargs, {"source": "test"})
    backbone, _ = load_backbone(out)
    model = build_model(backbone, _settings("paper"))
    body = model.backbone.body
    ours = {k for k in backbone.state_dict() if not k.startswith("fc.")}
    assert set(body.state_dict()) == ours
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(body.eval()(x)["3"], feature_grid(backbone.eval(), x))
