"""Patch-Seg beyond the default point: the things class set, size-stratified union metrics, the official CSV
row, --skip-blocks, --full-finetune and the grid of protocol names the DAG runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_patchseg import write_coco  # the solid-colour COCO-Stuff fixture

from densessl.config import EVALUATIONS, load_config
from densessl.data.coco import CocoStuffPatchSegDataset, coco_label_assignment
from densessl.errors import ConfigError
from densessl.evaluate.metrics import SizeUnionConfusion
from densessl.evaluate.patchseg import (
    PatchSegConfig,
    csv_header,
    csv_row,
    prune_blocks,
    reduce_labels,
    run_patchseg,
)
from densessl.models.backbones import create_backbone
from densessl.protocol_names import patchseg_grid, protocol_base


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


# ---------------------------------------------------------------- things class set

def test_things_folds_stuff_and_unlabelled_into_zero() -> None:
    raw = np.array([[255, 0, 90, 91, 181]], dtype=np.uint8)  # unlabelled, person, last thing, first stuff, last
    assert coco_label_assignment(raw).tolist() == [[0, 1, 91, 92, 182]]
    assert coco_label_assignment(raw, "things").tolist() == [[0, 1, 91, 0, 0]]
    # a patch of (stuff, thing 91): union over 92 classes keeps 91 and drops 0 (more than one class present)
    ids = torch.from_numpy(coco_label_assignment(np.array([[91, 90], [120, 90]], np.uint8), "things").astype(np.int64))
    u = reduce_labels(ids, 2, 92, "union")
    assert u.shape == (1, 1, 92) and u[0, 0].nonzero().flatten().tolist() == [91]


def test_things_dataset_has_92_classes(coco_root: Path) -> None:
    ds = CocoStuffPatchSegDataset(coco_root, "val", class_set="things")
    assert ds.num_classes == 92
    _, labels = ds[0]
    assert labels.max() <= 91


# ---------------------------------------------------------------- size-stratified union metrics

def test_size_stratified_counts_by_hand() -> None:
    # one image, 4 patches, 3 classes; sizes: class 0 1/4 -> bin 2, class 1 3/4 -> bin 7, class 2 absent -> bin 0
    targets = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]]])
    preds = torch.tensor([[[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]]])
    logits = torch.where(preds.bool(), 3.0, -3.0)
    m = SizeUnionConfusion(10)
    m.update(logits, targets)
    out = m.compute()
    # bin 2 (class 0): TP 1, FP 1, TN 2 -> recall 1, precision 1/2, accuracy 3/4
    assert out["counts"][2] == [[2, 1], [0, 1]]
    assert (out["recall"][2], out["precision"][2], out["accuracy"][2]) == (1.0, 0.5, 0.75)
    # bin 7 (class 1): TP 2, FN 1, TN 1 -> recall 2/3, precision 1, accuracy 3/4
    assert out["counts"][7] == [[1, 0], [1, 2]]
    assert out["recall"][7] == pytest.approx(2 / 3) and out["precision"][7] == 1.0
    # bin 0 (absent class 2): FP 1, TN 3 -> recall 0/0 = NaN, precision 0
    assert out["counts"][0] == [[3, 1], [0, 0]]
    assert math.isnan(out["recall"][0]) and out["precision"][0] == 0.0
    assert all(out["counts"][b] == [[0, 0], [0, 0]] for b in (1, 3, 4, 5, 6, 8, 9))
    assert out["f1"][2] == pytest.approx(2 * 0.5 * 1.0 / (1.5 + 1e-6))


def test_size_on_a_bin_edge_falls_in_the_lower_bin() -> None:
    # 10 patches: a class on 1 patch has size 0.1 = the first inner edge -> bin 0 (bucketize right=False);
    # on 2 patches 0.2 -> bin 1; on all 10 -> bin 9
    targets = torch.zeros(1, 10, 3)
    targets[0, :1, 0] = 1
    targets[0, :2, 1] = 1
    targets[0, :, 2] = 1
    assert SizeUnionConfusion(10).bins(targets).tolist() == [[0, 1, 9]]


# ---------------------------------------------------------------- official CSV row

def test_csv_header_and_row_are_the_official_format() -> None:
    assert csv_header() == ("dataset, label_reduction, output_head, backbone, skip_blocks, full_finetune, "
                            "num_epochs, loss, accuracy, macro_accuracy, macro_recall, macro_precision, macro_f1\n")
    metrics = {"dataset": "coco", "label_reduction": "majority", "output_head": "mlp", "num_epochs": 5,
               "loss": 0.25, "accuracy": 0.9, "macro_accuracy": 0.8, "macro_recall": 0.5,
               "macro_precision": float("nan"), "macro_f1": float("nan"),
               "config": {"skip_blocks": 2, "full_finetune": False}}
    assert csv_row(metrics, "dino/vit-s16-imagenet") == \
        "coco, majority, mlp, dino/vit-s16-imagenet, 2, False, 5, 0.25, 0.9, 0.8, 0.5, nan, nan\n"


# ---------------------------------------------------------------- --skip-blocks and --full-finetune

def test_skip_blocks_keeps_the_first_blocks_and_the_final_norm() -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit-tiny-p8").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # manual: blocks 0 and 1 of 4, then the final norm
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        expected = vit.norm(vit.blocks[1](vit.blocks[0](h)))
        pruned = prune_blocks(vit, 2)
        assert len(pruned.blocks) == 2
        torch.testing.assert_close(pruned.forward_features(x), expected)
    with pytest.raises(ConfigError, match="skip_blocks"):
        prune_blocks(create_backbone("vit-tiny-p8"), 4)


def _cfg(**kw: object) -> PatchSegConfig:
    base: dict[str, object] = {"dataset": "coco", "head": "linear", "label_reduction": "union", "batch_size": 4,
                               "epochs": 2, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "precision": "fp32"}
    base.update(kw)
    return PatchSegConfig(**base)  # type: ignore[arg-type]


def test_skip_blocks_and_full_finetune_leave_the_callers_backbone_alone(coco_root: Path) -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit-tiny-p8")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    frozen = run_patchseg(vit, coco_root, _cfg())
    tuned = run_patchseg(vit, coco_root, _cfg(full_finetune=True))
    skipped = run_patchseg(vit, coco_root, _cfg(skip_blocks=1))
    assert len(vit.blocks) == 4 and all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert tuned["feature_cache"] == {"train": False, "val": False} and tuned["full_finetune"]
    assert frozen["feature_cache"]["train"] and skipped["skip_blocks"] == 1
    # the backbone learned (losses differ from the frozen probe's from the first epoch's validation on)
    assert tuned["epochs"][0]["val"]["loss"] != frozen["epochs"][0]["val"]["loss"]
    assert skipped["epochs"][0]["val"]["loss"] != frozen["epochs"][0]["val"]["loss"]
    assert frozen["size_stratified"] is not None and len(frozen["size_stratified"]["recall"]) == 10


# ---------------------------------------------------------------- the grid as protocol names

def test_grid_points_resolve_to_their_base_with_fixed_settings() -> None:
    entry = EVALUATIONS["patchseg_ade20k.global-union-transformer"]
    assert entry["dataset"] == "ade20k" and entry["settings"] == "patchseg"
    assert entry["fixed"] == {"dataset": "ade20k", "label_reduction": "global-union", "head": "transformer"}
    assert "global-union labels, transformer head" in entry["title"]
    assert EVALUATIONS["patchseg_coco_things.majority-mlp"]["fixed"]["class_set"] == "things"
    assert "patchseg_coco.union-linear" in EVALUATIONS and "patchseg_coco.union-cnn" not in EVALUATIONS
    assert protocol_base("patchseg_coco.majority-mlp") == "patchseg_coco" and protocol_base("davis2017") == "davis2017"
    assert len(patchseg_grid("patchseg_coco")) == 11  # 3 reductions x 3 heads + the 2 union-only heads
    assert "patchseg_coco.union-linear" not in list(EVALUATIONS)  # iteration lists the base protocols


def test_config_takes_the_whole_grid_and_refuses_bad_names(tmp_path: Path) -> None:
    grid = patchseg_grid("patchseg_coco") + patchseg_grid("patchseg_ade20k")
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"results_dir": str(tmp_path / "r"), "evaluations": grid}))
    cfg = load_config([path])
    jobs = cfg.evaluation_jobs()
    assert {p for p, _ in jobs} == set(grid) and len({cfg.eval_metrics(p, r) for p, r in jobs}) == len(jobs)
    path.write_text(json.dumps({"evaluations": ["patchseg_coco.union-cnn"]}))
    with pytest.raises(ConfigError, match="evaluations"):
        load_config([path])


def test_grid_point_through_the_evaluate_stage(tmp_path: Path) -> None:
    from densessl.stages.convert import run_convert
    from densessl.stages.data import run_data
    from densessl.stages.evaluate import run_evaluate

    path = tmp_path / "config.yaml"
    protocol = "patchseg_coco_things.majority-mlp"
    path.write_text(json.dumps({"results_dir": str(tmp_path / "results"), "data": {"synthetic_size": "tiny"},
                                "evaluations": [protocol],
                                "evaluate": {"patchseg": {"epochs": 1, "batch_size": 4, "warmup_steps": 0,
                                                          "hidden_size": 16, "head": "transformer"}}}))
    cfg = load_config([path])
    run_data(cfg, "coco")
    run_id = "random-init/vit-tiny-p8-seed1"
    run_convert(cfg, run_id)
    out = run_evaluate(cfg, protocol, run_id, "cpu")
    m = json.loads(out.read_text())["metrics"]
    assert out.parent.parent.parent.name == protocol  # its own results folder
    assert (m["label_reduction"], m["output_head"], m["class_set"], m["num_classes"]) == ("majority", "mlp",
                                                                                          "things", 92)
    csv = (out.parent / "outputs-coco.csv").read_text().splitlines()
    assert csv[0] == csv_header().strip() and csv[1].startswith(f"coco, majority, mlp, {run_id}, 0, False, 1, ")



def test_report_tells_grid_points_apart(tmp_path: Path) -> None:
    from densessl.report.build import build_report

    path = tmp_path / "c.yaml"
    protocols = ["patchseg_coco", "patchseg_coco.majority-mlp", "knn_imagenet"]
    path.write_text(json.dumps({"preset": "smoke", "results_dir": str(tmp_path / "results"), "random_init_seeds": [0],
                                "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
                                "evaluations": protocols}))
    cfg = load_config([path])

    def write(p: Path, data: dict) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data))

    for dataset in cfg.datasets:
        write(cfg.data_manifest(dataset), {"fingerprint": {"content_sha256": "0" * 64, "listing_sha256": None},
                                           "provenance": {"wall_s": 1.0}})
    for protocol, run in cfg.evaluation_jobs():
        recall = 0.5 if protocol == "patchseg_coco" else 0.7
        values = ({"knn_top1": 40.0 - 10 * run.is_random_init, "knn_top5": 90.0} if protocol == "knn_imagenet" else
                  {"macro_recall": recall - 0.1 * run.is_random_init, "macro_f1_nanmean": 0.2,
                   "macro_precision_nanmean": 0.2, "macro_f1": None, "macro_precision": None, "accuracy": 0.4})
        write(cfg.eval_metrics(protocol, run), {"metrics": values, "provenance": {"wall_s": 1.0}})
    report = build_report(cfg).read_text()
    assert "COCO-Stuff (`patchseg_coco`)" in report
    assert "COCO-Stuff: majority labels, mlp head (`patchseg_coco.majority-mlp`)" in report
    assert "(`knn_imagenet`)" in report and "| knn_top1 |" in report
    summary = report.split("## Summary")[1].split("\n## ")[0]
    assert "patchseg_coco.majority-mlp macro_recall" in summary and "0.70 (+0.10)" in summary
