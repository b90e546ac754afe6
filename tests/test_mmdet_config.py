"""Generated mmdet configs of every detection protocol at both presets, with the published values asserted.

Built without training and without importing mmdet: the config is plain data generated from the preset's
settings and the backbone's architecture, so this runs wherever the DAG runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from densessl.config import EVALUATIONS, load_config
from densessl.errors import ConfigError, DataError
from densessl.evaluate.transfer.mmdet_backbone import backbone_spec, vit_out_indices
from densessl.evaluate.transfer.mmdet_config import build_config
from densessl.evaluate.transfer.mmdet_data_cfg import DatasetFiles, dataset_files
from densessl.evaluate.transfer.mmdet_protocols import PROTOCOLS, DetectionConfig
from densessl.methods.base import build_dataclass

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = {"coco": 80, "lvis": 1203, "cityscapes": 8, "voc": 20}
PAPER_ARCH = {"vit": ("vit-s16", {}), "resnet": ("resnet50", {"zero_init_residual": True})}
SMOKE_ARCH = {"vit": ("vit-tiny-p8", {}), "resnet": ("resnet-tiny", {"zero_init_residual": True})}


def _files(dataset: str, tmp: Path) -> DatasetFiles:
    """Stand-in paths with the real class counts (the paper datasets are not on this machine)."""
    classes = tuple(f"class{i}" for i in range(NUM_CLASSES[dataset]))
    part = {"ann_file": str(tmp / f"{dataset}_train.json"), "data_prefix": {"img": str(tmp) + "/"}}
    test = {"ann_file": str(tmp / f"{dataset}_val.json"), "data_prefix": {"img": str(tmp) + "/"}}
    train = (part, part) if dataset == "voc" else (part,)
    return DatasetFiles(dataset, tmp, train, test, classes, seg_prefix=tmp / "gtFine" / "val")


def _generate(preset: str, protocol: str, tmp: Path, **overrides):
    cfg = load_config([], preset=preset, root=ROOT)
    det = build_dataclass(DetectionConfig, {**cfg.eval_settings(protocol), **overrides}, protocol)
    family = PROTOCOLS[protocol]["backbones"][0]
    arch, kwargs = (PAPER_ARCH if preset == "paper" else SMOKE_ARCH)[family]
    spec = backbone_spec(arch, kwargs)
    files = _files(PROTOCOLS[protocol]["dataset"], tmp)
    return det, build_config(protocol, spec, files, det, tmp / "work", tmp / "export.safetensors")


def _scheduler(config, kind):
    return next(s for s in config["param_scheduler"] if s["type"] == kind)


def test_every_protocol_is_registered_with_its_families_and_settings():
    for name, spec in PROTOCOLS.items():
        assert EVALUATIONS[name]["dataset"] == spec["dataset"]
        assert EVALUATIONS[name]["backbones"] == spec["backbones"]
        for preset in ("smoke", "paper"):
            cfg = load_config([], preset=preset, root=ROOT)
            assert cfg.eval_settings(name), f"{preset}.yaml has no evaluate.{name} block"
    assert set(PROTOCOLS) <= set(load_config([], preset="smoke", root=ROOT).evaluations)


@pytest.mark.parametrize("preset", ["smoke", "paper"])
@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_config_builds_with_consistent_shapes(preset, protocol, tmp_path):
    det, config = _generate(preset, protocol, tmp_path)
    model = config["model"]
    info = PROTOCOLS[protocol]
    n = NUM_CLASSES[info["dataset"]]
    assert model["type"] == ("MaskRCNN" if info["mask"] else "FasterRCNN")
    assert model["roi_head"]["bbox_head"]["num_classes"] == n
    assert ("mask_head" in model["roi_head"]) == info["mask"]
    assert config["train_dataloader"]["batch_size"] == det.batch_size_per_gpu
    assert config["optim_wrapper"]["optimizer"]["lr"] == det.lr
    loop = config["train_cfg"]
    assert loop.get("max_epochs", loop.get("max_iters")) == det.max_length
    assert _scheduler(config, "MultiStepLR")["milestones"] == list(det.milestones)
    # every pretrained part loads the safetensors export through the toolkit's Pretrained init
    assert model["backbone"]["init_cfg"]["checkpoint"].startswith("safetensors://")
    if info["detector"] == "c4":
        assert model["roi_head"]["shared_head"]["init_cfg"]["prefix"] == "roi_head.shared_head."
    # the preprocessor normalises as the backbones were pretrained (torchvision RGB statistics)
    assert model["data_preprocessor"]["mean"] == [123.675, 116.28, 103.53]
    assert model["data_preprocessor"]["bgr_to_rgb"] is True


def test_paper_vit_fpn_coco_is_the_selfpatch_gtsa_recipe(tmp_path):
    det, c = _generate("paper", "maskrcnn_vit_fpn_coco", tmp_path)
    assert c["train_cfg"] == {"type": "EpochBasedTrainLoop", "max_epochs": 12, "val_interval": 13}
    assert _scheduler(c, "MultiStepLR")["milestones"] == [8, 11]
    assert _scheduler(c, "LinearLR") == {"type": "LinearLR", "start_factor": 0.001, "by_epoch": False, "begin": 0,
                                         "end": 1000}
    opt = c["optim_wrapper"]
    assert opt["type"] == "OptimWrapper"  # GTSA: no AMP
    assert opt["optimizer"] == {"type": "AdamW", "lr": 5e-5, "betas": (0.9, 0.999), "weight_decay": 0.05}
    assert set(opt["paramwise_cfg"]["custom_keys"]) == {"pos_embed", "cls_token", "norm"}
    assert det.total_batch == 8 and c["train_dataloader"]["batch_size"] == 1
    bb = c["model"]["backbone"]
    assert bb["type"] == "DenseSSLViTFPN" and bb["out_indices"] == [3, 5, 7, 11]
    assert bb["num_heads"] == 6 and bb["drop_path_rate"] == 0.05 and bb["norm_cfg"]["type"] == "SyncBN"
    assert c["model"]["neck"]["in_channels"] == [384] * 4 and c["model"]["neck"]["out_channels"] == 256
    assert c["model"]["rpn_head"]["anchor_generator"]["strides"] == [4, 8, 16, 32, 64]
    assert c["model"]["roi_head"]["bbox_roi_extractor"]["featmap_strides"] == [4, 8, 16, 32]
    resize = c["train_dataloader"]["dataset"]["pipeline"][2]
    assert resize["type"] == "RandomChoice"
    scales = resize["transforms"][0][0]["scales"]
    assert scales == [(1333, s) for s in range(480, 801, 32)]
    crop = resize["transforms"][1]
    assert crop[0]["scales"] == [(1333, 400), (1333, 500), (1333, 600)]
    assert crop[1]["crop_type"] == "absolute_range" and crop[1]["crop_size"] == (384, 600)
    assert c["test_dataloader"]["dataset"]["pipeline"][1]["scale"] == (1333, 800)
    assert c["test_evaluator"]["type"] == "CocoMetric" and c["test_evaluator"]["metric"] == ["bbox", "segm"]
    # SelfPatch's official 8 heads for a 6-head ViT-S is a flag
    _, c8 = _generate("paper", "maskrcnn_vit_fpn_coco", tmp_path, vit_num_heads=8)
    assert c8["model"]["backbone"]["num_heads"] == 8


def test_paper_r50_c4_coco_is_the_moco_pixpro_clove_protocol(tmp_path):
    _, c = _generate("paper", "maskrcnn_r50_c4_coco", tmp_path)
    assert c["train_cfg"] == {"type": "IterBasedTrainLoop", "max_iters": 90000, "val_interval": 90001}
    assert _scheduler(c, "MultiStepLR")["milestones"] == [60000, 80000]
    assert c["optim_wrapper"]["optimizer"] == {"type": "SGD", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4}
    assert c["train_dataloader"]["batch_size"] * 8 == 16
    assert c["train_dataloader"]["sampler"]["type"] == "InfiniteSampler"
    bb = c["model"]["backbone"]
    assert (bb["type"], bb["depth"], bb["num_stages"], bb["out_indices"]) == ("ResNet", 50, 3, (2,))
    assert bb["style"] == "pytorch" and bb["norm_cfg"] == {"type": "SyncBN", "requires_grad": True}
    assert bb["norm_eval"] is False and bb["frozen_stages"] == -1
    head = c["model"]["roi_head"]["shared_head"]
    assert head == {**head, "type": "DenseSSLRes5Head", "in_channels": 1024, "planes": 512, "num_blocks": 3,
                    "stride": 2, "extra_norm": True, "norm_cfg": {"type": "SyncBN", "requires_grad": True}}
    roi = c["model"]["roi_head"]
    assert roi["bbox_roi_extractor"]["roi_layer"]["output_size"] == 14
    assert roi["bbox_roi_extractor"]["featmap_strides"] == [16]
    assert roi["bbox_head"]["in_channels"] == 2048 and roi["bbox_head"]["with_avg_pool"]
    assert roi["mask_head"]["num_convs"] == 0 and c["model"]["train_cfg"]["rcnn"]["mask_size"] == 14
    assert c["model"]["test_cfg"]["rpn"]["nms_pre"] == 6000 and c["model"]["test_cfg"]["rpn"]["max_per_img"] == 1000
    resize = c["train_dataloader"]["dataset"]["pipeline"][2]
    assert resize["scales"] == [(1333, s) for s in range(640, 801, 32)]
    _, c2x = _generate("paper", "maskrcnn_r50_c4_coco", tmp_path, schedule="2x")
    assert c2x["train_cfg"]["max_iters"] == 180000
    assert _scheduler(c2x, "MultiStepLR")["milestones"] == [120000, 160000]


def test_paper_r50_fpn_coco_lvis_cityscapes(tmp_path):
    _, c = _generate("paper", "maskrcnn_r50_fpn_coco", tmp_path)
    assert c["train_cfg"]["max_epochs"] == 12 and _scheduler(c, "LinearLR")["end"] == 500
    assert c["model"]["neck"]["in_channels"] == [256, 512, 1024, 2048]
    assert c["train_dataloader"]["dataset"]["pipeline"][2] == {"type": "Resize", "scale": (1333, 800),
                                                               "keep_ratio": True}
    _, c2x = _generate("paper", "maskrcnn_r50_fpn_coco", tmp_path, schedule="2x")
    assert c2x["train_cfg"]["max_epochs"] == 24 and _scheduler(c2x, "MultiStepLR")["milestones"] == [16, 22]

    _, lv = _generate("paper", "maskrcnn_r50_fpn_lvis", tmp_path)
    assert lv["train_dataloader"]["dataset"]["type"] == "ClassBalancedDataset"
    assert lv["train_dataloader"]["dataset"]["oversample_thr"] == 1e-3
    assert lv["model"]["test_cfg"]["rcnn"]["score_thr"] == 1e-4
    assert lv["model"]["test_cfg"]["rcnn"]["max_per_img"] == 300
    assert lv["test_evaluator"]["type"] == "LVISMetric"
    inner = lv["train_dataloader"]["dataset"]["dataset"]
    assert inner["type"] == "LVISV1Dataset"
    assert inner["pipeline"][2]["scales"] == [(1333, s) for s in range(640, 801, 32)]

    det, cs = _generate("paper", "maskrcnn_r50_fpn_cityscapes", tmp_path)
    assert det.total_batch == 8 and cs["optim_wrapper"]["optimizer"]["lr"] == 0.01
    assert cs["train_cfg"]["max_epochs"] == 8 and _scheduler(cs, "MultiStepLR")["milestones"] == [7]
    assert cs["train_dataloader"]["dataset"]["type"] == "RepeatDataset"
    assert cs["train_dataloader"]["dataset"]["times"] == 8
    resize = cs["train_dataloader"]["dataset"]["dataset"]["pipeline"][2]
    assert resize == {"type": "RandomResize", "scale": [(2048, 800), (2048, 1024)], "keep_ratio": True}
    assert cs["test_dataloader"]["dataset"]["pipeline"][1]["scale"] == (2048, 1024)
    assert cs["model"]["roi_head"]["bbox_head"]["loss_bbox"]["type"] == "SmoothL1Loss"
    assert [e["type"] for e in cs["test_evaluator"]] == ["CocoMetric", "CityScapesMetric"]


def test_paper_faster_rcnn_c4_voc(tmp_path):
    _, c = _generate("paper", "fasterrcnn_r50_c4_voc", tmp_path)
    assert c["model"]["type"] == "FasterRCNN" and "mask_head" not in c["model"]["roi_head"]
    assert c["train_cfg"]["max_iters"] == 24000 and _scheduler(c, "MultiStepLR")["milestones"] == [18000, 22000]
    assert _scheduler(c, "LinearLR")["end"] == 100
    assert c["train_dataloader"]["dataset"]["type"] == "ConcatDataset"
    assert len(c["train_dataloader"]["dataset"]["datasets"]) == 2
    assert c["train_dataloader"]["dataset"]["datasets"][0]["pipeline"][2]["scales"][0] == (1333, 480)
    ev = c["test_evaluator"]
    assert ev["type"] == "VOCMetric" and ev["eval_mode"] == "11points"
    assert ev["iou_thrs"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert c["model"]["roi_head"]["shared_head"]["extra_norm"] is True


def test_smoke_heads_take_their_widths_from_the_tiny_backbones(tmp_path):
    _, fpn = _generate("smoke", "maskrcnn_r50_fpn_coco", tmp_path)
    assert fpn["model"]["backbone"]["type"] == "DenseSSLResNet"
    assert fpn["model"]["neck"]["in_channels"] == [16, 32, 64, 128]
    assert fpn["model"]["roi_head"]["bbox_roi_extractor"]["featmap_strides"] == [2, 4, 8, 8]
    _, c4 = _generate("smoke", "maskrcnn_r50_c4_coco", tmp_path)
    head = c4["model"]["roi_head"]["shared_head"]
    assert (head["in_channels"], head["planes"], head["num_blocks"], head["stride"]) == (64, 128, 1, 1)
    assert c4["model"]["rpn_head"]["in_channels"] == 64
    assert c4["model"]["roi_head"]["bbox_head"]["in_channels"] == 128
    assert c4["model"]["train_cfg"]["rcnn"]["mask_size"] == 28  # res5 keeps 14x14 (stride 1), mask head doubles
    _, vit = _generate("smoke", "maskrcnn_vit_fpn_coco", tmp_path)
    assert vit["model"]["backbone"]["out_indices"] == [0, 1, 2, 3]
    assert vit["model"]["neck"]["in_channels"] == [128] * 4
    assert vit_out_indices(12) == (3, 5, 7, 11)


def test_a_protocol_refuses_the_other_family(tmp_path):
    cfg = load_config([], preset="smoke", root=ROOT)
    det = build_dataclass(DetectionConfig, cfg.eval_settings("maskrcnn_vit_fpn_coco"), "x")
    with pytest.raises(ConfigError, match="vit backbones"):
        build_config("maskrcnn_vit_fpn_coco", backbone_spec("resnet-tiny", {}), _files("coco", tmp_path), det,
                     tmp_path, None)
    assert not cfg.applies("maskrcnn_r50_c4_coco", cfg.run("dino/vit-tiny-p8-imagenet"))
    assert cfg.applies("maskrcnn_vit_fpn_coco", cfg.run("dino/vit-tiny-p8-imagenet"))


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="schedule"):
        DetectionConfig(schedule="3x")
    with pytest.raises(ConfigError, match="milestones"):
        DetectionConfig(schedules={"1x": {"max_length": 10, "milestones": [12]}})
    with pytest.raises(ConfigError, match="schedules.2x"):
        DetectionConfig(schedule="2x", schedules={"1x": {"max_length": 10, "milestones": [5]}})


def test_synthetic_layouts_are_found_and_missing_files_named(tmp_path):
    from densessl.data.cityscapes import convert
    from densessl.data.synthetic import synthesize

    for name in ("coco", "lvis", "cityscapes", "voc"):
        synthesize(name, tmp_path / name, "tiny", 0)
    convert(tmp_path / "cityscapes", tmp_path / "cs_ann")
    coco = dataset_files("coco", tmp_path / "coco")
    assert len(coco.classes) == 8 and Path(coco.test["ann_file"]).is_file()
    lvis = dataset_files("lvis", tmp_path / "lvis")
    assert len(lvis.classes) == 8
    cs = dataset_files("cityscapes", tmp_path / "cityscapes", converted=tmp_path / "cs_ann")
    assert cs.classes == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    voc = dataset_files("voc", tmp_path / "voc")
    assert len(voc.classes) == 20 and len(voc.train) == 2
    with pytest.raises(DataError, match="instances_train2017.json"):
        dataset_files("coco", tmp_path / "lvis")
    with pytest.raises(DataError, match="re-run the data stage"):
        dataset_files("cityscapes", tmp_path / "cityscapes", converted=tmp_path / "nothing")
    with pytest.raises(DataError, match="VOC2007"):
        dataset_files("voc", tmp_path / "coco")


def test_each_protocol_names_the_published_tables_it_reproduces():
    from densessl.report.paper_tables import load_tables

    tables = {t.id: t for t in load_tables()}
    for name, spec in PROTOCOLS.items():
        assert spec["tables"], name
        for table_id in spec["tables"]:
            assert {c.protocol for c in tables[table_id].columns} == {name}, table_id


def test_toolkit_metric_keys_become_the_tables_names():
    from densessl.evaluate.transfer.mmdet_run import detection_metrics

    coco = detection_metrics("coco", {"coco/bbox_mAP": 0.412, "coco/bbox_mAP_50": 0.611, "coco/bbox_mAP_75": 0.45,
                                      "coco/segm_mAP": 0.371, "coco/segm_mAP_s": -1.0})
    assert coco["AP_bb"] == pytest.approx(41.2) and coco["AP_bb50"] == pytest.approx(61.1)
    assert coco["AP_mk"] == pytest.approx(37.1) and coco["AP_mk_s"] is None  # pycocotools' -1 = no ground truth
    assert coco["toolkit"]["coco/bbox_mAP"] == 0.412
    lvis = detection_metrics("lvis", {"lvis/bbox_AP": 0.2, "lvis/segm_AP": 0.19, "lvis/segm_APr": 0.1,
                                      "lvis/segm_APc": 0.18, "lvis/segm_APf": 0.25, "lvis/bbox_APr": 0.09})
    assert (lvis["APr"], lvis["APc"], lvis["APf"]) == pytest.approx((10.0, 18.0, 25.0))
    assert lvis["AP_bb_r"] == pytest.approx(9.0)
    cs = detection_metrics("cityscapes", {"cityscapes/mAP": 0.372, "cityscapes/AP@50": 0.653, "coco/bbox_mAP": 0.4})
    assert (cs["AP"], cs["AP50"], cs["AP_bb"]) == pytest.approx((37.2, 65.3, 40.0))
    voc = detection_metrics("voc", {"pascal_voc/mAP": 0.602, "pascal_voc/AP50": 0.838, "pascal_voc/AP75": 0.677})
    assert (voc["AP"], voc["AP50"], voc["AP75"]) == pytest.approx((60.2, 83.8, 67.7))
    with pytest.raises(ConfigError, match="returned no AP_bb"):
        detection_metrics("coco", {})


def test_the_lvis_api_scores_the_synthetic_lvis_files(tmp_path):
    """The kept LVIS evaluator runs on the locked numpy (lvis 0.5.3 calls the removed np.float alias) and gives
    AP 100 for the ground truth itself."""
    from densessl.data.synthetic import synthesize
    from densessl.evaluate.transfer.mmdet_run import lvis_numpy_compat

    synthesize("lvis", tmp_path / "lvis", "tiny", 0)
    lvis_numpy_compat()
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(str(tmp_path / "lvis" / "lvis_v1_val.json"))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    ev = LVISEval(gt, LVISResults(gt, dets), "bbox")
    ev.run()
    assert ev.results["AP"] == pytest.approx(1.0)


def test_cityscapes_conversion_gives_coco_instances_of_the_gtfine_ids(tmp_path):
    import numpy as np
    from PIL import Image
    from pycocotools.coco import COCO

    from densessl.data.cityscapes import convert
    from densessl.data.synthetic import synthesize

    root = tmp_path / "cityscapes"
    synthesize("cityscapes", root, "tiny", 0)
    counts = convert(root, tmp_path / "ann")
    assert counts["val"]["images"] == 2 and counts["val"]["instances"] > 0
    coco = COCO(str(tmp_path / "ann" / "instancesonly_filtered_gtFine_val.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    for img in coco.loadImgs(coco.getImgIds()):
        assert (root / "leftImg8bit" / "val" / img["file_name"]).is_file()
        ids = np.asarray(Image.open(root / "gtFine" / "val" / img["file_name"].replace(
            "leftImg8bit.png", "gtFine_instanceIds.png")))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            mask = coco.annToMask(ann).astype(bool)
            values = np.unique(ids[mask])
            assert len(values) == 1 and values[0] // 1000 == ann["category_id"]  # one gtFine instance per annotation
            assert mask.sum() == (ids == values[0]).sum()


def test_detection_jobs_ask_for_their_published_gpus():
    paper = load_config([], preset="paper", root=ROOT)
    assert paper.eval_gpus("maskrcnn_r50_c4_coco") == 8 and paper.eval_gpus("maskrcnn_vit_fpn_coco") == 8
    assert paper.eval_gpus("linear_ade20k") == 1
    assert load_config([], preset="smoke", root=ROOT).eval_gpus("maskrcnn_r50_c4_coco") == 0


def test_report_shows_the_tables_columns_and_picks_each_protocols_own_table():
    from densessl.config import Run
    from densessl.report.build import REPORTED_METRICS
    from densessl.report.paper_tables import load_tables, published_value

    tables = load_tables()
    for name, spec in PROTOCOLS.items():
        columns = {c.metric for t in tables if t.id in spec["tables"] for c in t.columns}
        assert columns <= set(REPORTED_METRICS[name]), name
    dino = Run("dino", "vit-s16", "imagenet")
    # selfpatch_coco_maskrcnn's DINO row; the same run and metric must not leak into another detection protocol
    assert published_value("maskrcnn_vit_fpn_coco", dino, "AP_bb", False, 100) == 40.8
    assert published_value("maskrcnn_r50_fpn_coco", dino, "AP_bb", False, 100) is None
