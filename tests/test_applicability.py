"""Protocols evaluate only the backbone families they apply to (iNat fine-tuning is ViT-only), everywhere:
the DAG's evaluation jobs, the DVC stages and the report, which says "n/a" instead of failing."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO

from densessl import dvc_stages
from densessl.config import load_config
from densessl.report.build import build_report

RUNS = [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"},
        {"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}]


def _cfg(tmp_path, evaluations):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "results_dir": str(tmp_path / "results"), "runs": RUNS,
                                    "random_init_seeds": [0], "evaluations": evaluations}))
    return load_config([path], root=REPO)


def test_inat_finetuning_skips_resnets_and_nothing_else(tmp_path):
    cfg = _cfg(tmp_path, ["patchseg_coco", "linear_ade20k", "davis2017", "inat19_finetune"])
    jobs = {(p, r.id) for p, r in cfg.evaluation_jobs()}
    resnets = {r.id for r in cfg.all_runs if r.arch.startswith("resnet")}
    vits = {r.id for r in cfg.all_runs} - resnets
    assert resnets == {"clove/resnet-tiny-imagenet", "supervised/resnet-tiny.clove-imagenet",
                       "random-init/resnet-tiny.clove-seed0"}
    assert {rid for p, rid in jobs if p == "inat19_finetune"} == vits
    for protocol in ("patchseg_coco", "linear_ade20k", "davis2017"):
        assert {rid for p, rid in jobs if p == protocol} == vits | resnets
    eval_stages = [name for name in dvc_stages.stages(cfg) if name.startswith("eval")]
    assert len(eval_stages) == len(jobs) == 3 * 6 + 3  # DINO, CLoVE, two references, a seed of each network


def test_paper_preset_evaluates_clove_on_everything_but_the_vit_protocols():
    cfg = load_config([REPO / "config.yaml"], preset="paper", root=REPO)
    clove = [r for r in cfg.all_runs if r.method == "clove"][0]
    # the GTSA fine-tuning, the mmseg ViT decoders, the ViT Mask R-CNN
    vit_only = {"inat19_finetune", "semfpn_ade20k", "upernet_ade20k", "maskrcnn_vit_fpn_coco"}
    assert vit_only <= set(cfg.evaluations)
    assert {p for p, r in cfg.evaluation_jobs() if r == clove} == set(cfg.evaluations) - vit_only


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_marks_inapplicable_cells_and_explains_patchseg_means(tmp_path):
    cfg = _cfg(tmp_path, ["patchseg_coco", "inat19_finetune"])
    for dataset in cfg.datasets:
        _write(cfg.data_manifest(dataset), {"fingerprint": {"content_sha256": "0" * 64, "listing_sha256": None},
                                            "provenance": {"wall_s": 1.0}})
    for protocol, run in cfg.evaluation_jobs():  # no file for (inat, ResNet): the report must not ask for one
        values = ({"macro_recall": 0.3, "macro_f1_nanmean": 0.2, "macro_precision_nanmean": 0.25,
                   "macro_f1": None, "macro_precision": None, "accuracy": 0.4}
                  if protocol == "patchseg_coco" else {"top1": 10.0 + run.is_random_init, "top5": 30.0})
        _write(cfg.eval_metrics(protocol, run), {"metrics": values, "provenance": {"wall_s": 1.0}})
    report = build_report(cfg).read_text()
    summary = report.split("## Summary")[1].split("\n## ")[0]
    clove_row = [line for line in summary.splitlines() if line.startswith("| CLoVE")][0]
    assert clove_row.rstrip().endswith("| n/a |")
    inat = report.split("iNaturalist 2019")[1].split("\n## ")[0]
    assert "ResNet" not in inat and "DINO" in inat
    patchseg = report.split("Patch-Seg probe")[1].split("\n## ")[0]
    assert "| macro_precision_nanmean | macro_f1 | macro_precision |" in patchseg
    assert "precision 0/0" in patchseg  # the note on the official NaN means


def test_published_numbers_match_the_runs_epochs():
    from densessl.config import Run
    from densessl.report.build import display
    from densessl.report.paper_tables import parse_tables, published_value

    raw = {"id": "t", "title": "t", "source": "s", "evaluation": "patchseg_coco", "columns": ["macro_recall"],
           "rows": [{"method": "CLoVE", "arch": "R50", "pretrain_data": None, "epochs": 200,
                     "values": {"macro_recall": 0.2},
                     "run": {"method": "clove", "arch": "resnet50", "data": "imagenet", "epochs": 200}},
                    {"method": "CLoVE", "arch": "R50", "pretrain_data": None, "epochs": 400,
                     "values": {"macro_recall": 0.4},
                     "run": {"method": "clove", "arch": "resnet50", "data": "imagenet", "epochs": 400}},
                    {"method": "CLoVE (released)", "arch": "R50", "pretrain_data": None, "epochs": None,
                     "values": {"macro_recall": 0.3},
                     "run": {"method": "clove", "arch": "resnet50", "data": "imagenet", "released": True}}]}
    tables = tuple(parse_tables([raw]))
    ours = Run("clove", "resnet50", "imagenet", epochs=200)
    assert display(ours)[0] == "CLoVE (200 ep)"
    assert published_value("patchseg_coco", ours, "macro_recall", False, 200, tables) == 0.2
    assert published_value("patchseg_coco", Run("clove", "resnet50", "imagenet"), "macro_recall", False, 400,
                           tables) == 0.4
    released = Run("clove", "resnet50", "imagenet", released=True)  # released weights: only a released row
    assert published_value("patchseg_coco", released, "macro_recall", False, None, tables) == 0.3
    assert published_value("patchseg_coco", ours, "macro_recall", True, 200, tables) is None  # synthetic data
    assert published_value("linear_ade20k", ours, "macro_recall", False, 200, tables) is None  # another protocol


def test_evaluate_stage_refuses_a_pair_the_protocol_does_not_take(tmp_path):
    from densessl.errors import ConfigError
    from densessl.stages.evaluate import run_evaluate

    cfg = _cfg(tmp_path, ["inat19_finetune"])
    with pytest.raises(ConfigError, match="takes vit backbones, and clove/resnet-tiny-imagenet is a resnet-tiny"):
        run_evaluate(cfg, "inat19_finetune", "clove/resnet-tiny-imagenet")
