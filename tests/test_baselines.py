"""Which baselines each protocol evaluates (a preset setting), checked at the configuration level: the
supervised reference rows, per-protocol run selection, the paper preset's empty baseline set, and that the
Snakemake DAG and the DVC stages hold the same jobs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from densessl import dvc_stages
from densessl.config import load_config
from densessl.errors import ConfigError

RUNS = [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"},
        {"method": "selfpatch", "arch": "vit-tiny-p8", "data": "imagenet"},
        {"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}]
SUPERVISED = {"vit": "supervised/vit-tiny-p8-coco", "resnet": "supervised/resnet-tiny.clove-imagenet"}


def _cfg(tmp_path, **extra):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "results_dir": str(tmp_path / "results"), "runs": RUNS,
                                    "random_init_seeds": [0, 1, 2], **extra}))
    return load_config([path], root=REPO)


def _ids(runs):
    return {r.id for r in runs}


def test_smoke_default_is_every_row_plus_the_supervised_reference(tmp_path):
    cfg = _cfg(tmp_path)
    assert [r.id for r in cfg.supervised_runs] == [SUPERVISED["vit"], SUPERVISED["resnet"]]
    assert all(r.role == "supervised-reference" for r in cfg.supervised_runs)
    # the references train through the pretrain stage, drawn as the random-init rows they are compared with
    assert _ids(cfg.supervised_runs) <= _ids(cfg.pretrain_runs)
    assert cfg.variant_of(cfg.run(SUPERVISED["resnet"])) == "clove"
    assert cfg.pretrain_settings(cfg.run(SUPERVISED["resnet"]))["method"]["variant"] == "clove"
    assert cfg.pretrain_settings(cfg.run(SUPERVISED["vit"]))["method"]["variant"] is None
    # the random-init networks are those of the methods (the references add none of their own)
    networks = {(r.arch, r.variant) for r in cfg.baseline_runs}
    assert networks == {("vit-tiny-p8", None), ("vit-tiny-p8", "selfpatch"), ("resnet-tiny", "clove")}
    rows = {r.id for r in cfg.method_runs} | _ids(cfg.supervised_runs) | _ids(cfg.baseline_runs)
    selected = set(cfg.data["baselines"].get("protocols") or {})  # e.g. the detectors: fewer rows
    unselected = [p for p in cfg.evaluations if p not in selected]
    assert unselected
    for protocol in unselected:
        assert _ids(cfg.protocol_runs(protocol)) == rows
    jobs = [p for p, _ in cfg.evaluation_jobs()]
    assert sum(p in unselected for p in jobs) == len(unselected) * (3 + 2 + 9)


def test_a_protocol_selects_its_methods_seeds_and_the_reference(tmp_path):
    cfg = _cfg(tmp_path, evaluations=["patchseg_coco", "davis2017", "inat19_finetune"], baselines={
        "protocols": {"davis2017": {"methods": ["dino", "clove"], "random_init_seeds": [0]},
                      "inat19_finetune": {"methods": ["dino"], "random_init_seeds": [1],
                                          "supervised_reference": False}}})
    assert _ids(cfg.protocol_runs("davis2017")) == {
        "dino/vit-tiny-p8-imagenet", "clove/resnet-tiny-imagenet", *SUPERVISED.values(),
        "random-init/vit-tiny-p8-seed0", "random-init/resnet-tiny.clove-seed0"}
    # ViT-only protocol, no reference: DINO and the seed of its network only
    assert _ids(cfg.protocol_runs("inat19_finetune")) == {"dino/vit-tiny-p8-imagenet", "random-init/vit-tiny-p8-seed1"}
    # a protocol not listed keeps every row
    assert len(cfg.protocol_runs("patchseg_coco")) == 3 + 2 + 9
    # the rows exported are those some protocol evaluates, each once
    assert _ids(cfg.baseline_runs) == {r.id for p in cfg.evaluations for r in cfg.protocol_runs(p) if r.is_random_init}
    assert len(cfg.baseline_runs) == len(_ids(cfg.baseline_runs)) == 9


def test_no_seeds_means_no_random_init_rows_and_no_reference_check(tmp_path):
    cfg = _cfg(tmp_path, baselines={"supervised_reference": [],
                                    "protocols": {"davis2017": {"random_init_seeds": []}}})
    assert not any(r.is_random_init for r in cfg.protocol_runs("davis2017"))
    assert any(r.is_random_init for r in cfg.protocol_runs("patchseg_coco"))
    assert not cfg.supervised_runs and not any(r.is_supervised for r in cfg.all_runs)


def test_paper_preset_evaluates_baselines_only_where_a_table_publishes_them():
    cfg = load_config([REPO / "config.yaml"], preset="paper", root=REPO)
    assert not cfg.supervised_runs
    assert [r.id for r in cfg.baseline_runs] == ["random-init/resnet50.clove-seed0"]
    # the ResNet-50 transfer tables' "Rand init" / "Scratch" rows (report/paper_tables.yaml), nowhere else
    assert {p for p, r in cfg.evaluation_jobs() if r.is_random_init} == {
        "maskrcnn_r50_c4_coco", "maskrcnn_r50_fpn_coco", "maskrcnn_r50_fpn_lvis", "maskrcnn_r50_fpn_cityscapes",
        "keypointrcnn_r50_fpn_coco"}
    assert all(r.role in ("pretrained", "released", "random-init") for _, r in cfg.evaluation_jobs())
    # in particular no random-init ViT is fine-tuned on iNat for 300 epochs
    assert {r.method for p, r in cfg.evaluation_jobs() if p == "inat19_finetune"} <= {"dino", "selfpatch", "loca", "gtsa"}


def test_dvc_stages_hold_exactly_the_selected_jobs(tmp_path):
    cfg = _cfg(tmp_path, evaluations=["patchseg_coco", "davis2017"],
               baselines={"protocols": {"davis2017": {"methods": ["dino"], "random_init_seeds": [0]}}})
    stages = dvc_stages.stages(cfg)
    evals = {n for n in stages if n.startswith("eval_")}
    assert evals == {dvc_stages._name("eval", p, r.id) for p, r in cfg.evaluation_jobs()}
    assert {n for n in stages if n.startswith("convert_")} == {dvc_stages._name("convert", r.id) for r in cfg.all_runs}
    assert {n for n in stages if n.startswith("pretrain_")} == {dvc_stages._name("pretrain", r.id)
                                                               for r in cfg.pretrain_runs}
    assert dvc_stages._name("pretrain", SUPERVISED["resnet"]) in stages


def test_snakemake_builds_the_same_evaluations_as_dvc(tmp_path):
    extra = {"evaluations": ["patchseg_coco", "davis2017"],
             "baselines": {"protocols": {"davis2017": {"methods": ["clove"], "random_init_seeds": [2],
                                                       "supervised_reference": False}}}}
    cfg = _cfg(tmp_path, **extra)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"results_dir": "results", "runs": RUNS,
                                                          "random_init_seeds": [0, 1, 2], **extra}))
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "-n", "--quiet", "rules"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in dry.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["evaluate"] == len(cfg.evaluation_jobs()) == 14 + 2
    assert counts["pretrain"] == len(cfg.pretrain_runs) == 5


def test_bad_baseline_settings_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"baselines\.protocols\.patchseg_cocoo: not a protocol"):
        _cfg(tmp_path, baselines={"protocols": {"patchseg_cocoo": {"methods": ["dino"]}}})
    with pytest.raises(ConfigError, match=r"variant 'clove' is not a vit variant"):
        _cfg(tmp_path, baselines={"supervised_reference": [{"arch": "vit-tiny-p8", "data": "imagenet",
                                                             "variant": "clove"}]})
    with pytest.raises(ConfigError, match="baselines.supervised_reference.0.data"):
        _cfg(tmp_path, baselines={"supervised_reference": [{"arch": "vit-tiny-p8", "data": "ade20k"}]})
