"""End-to-end: the real Snakemake DAG (data → pretrain → convert → evaluate → report) at reduced size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

REDUCED = {
    "results_dir": "results",
    "threads": 1,
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],  # all five: test below
    "data": {"synthetic_size": "tiny"},
    # the ViT's supervised reference (the ResNet's runs in the test of every method below)
    "baselines": {"supervised_reference": [{"arch": "vit-tiny-p8", "data": "coco"}]},
    # the frozen-feature and fine-tuning protocols; each transfer protocol runs through the evaluate stage in its
    # own tests and through the whole smoke DAG in `make smoke`
    "evaluations": ["patchseg_coco", "linear_ade20k", "davis2017", "knn_imagenet"],
    "pretrain": {"dino": {"train": {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0,
                                    "checkpoint_every_steps": 2}},
                 "supervised": {"train": {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0},
                                # the preset's ViT reference settings are per architecture: shrink those too
                                "arch": {"vit-tiny-p8": {"train": {"epochs": 1, "batch_size_per_gpu": 4}}}}},
    "evaluate": {"patchseg": {"epochs": 2, "batch_size": 4, "warmup_steps": 2},
                 "linear_seg": {"iterations": 4, "batch_size": 2}},
}


def snakemake(workdir, *args):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(workdir / "config.yaml"), *args],
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.e2e
def test_smoke_dag_end_to_end(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(REDUCED))
    run = snakemake(tmp_path, "--cores", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = tmp_path / "results/smoke/report"
    tables = json.loads((report / "tables.json").read_text())
    cells = tables["results"]  # the per-protocol sections' cells (docs/report.md)
    keys = {"table", "protocol", "run", "role", "network", "seed", "metric", "value", "published", "source",
            "method", "arch", "pretrain_data"}
    assert cells and all(keys <= set(c) for c in cells)
    # synthetic data: no published number is compared with a smoke run
    assert tables["accounting"]["matched"] == 0 and all(c["value"] is None for c in tables["cells"])
    assert {c["table"] for c in cells} == {"patchseg_coco", "linear_ade20k", "davis2017", "knn_imagenet"}
    methods = {c["method"] for c in cells}
    assert "DINO" in methods and sum(m.startswith("random init") for m in methods) == 3
    reference = {(c["table"], c["run"]) for c in cells if c["role"] == "supervised-reference"}
    assert reference == {(t, "supervised/vit-tiny-p8-coco") for t in ("patchseg_coco", "linear_ade20k", "davis2017",
                                                                       "knn_imagenet")}
    assert {c["method"] for c in cells if c["role"] == "supervised-reference"} == {"supervised reference"}
    assert all(c["published"] is None for c in cells)  # synthetic data is never compared with papers
    assert all(c["value"] is None or isinstance(c["value"], float) for c in cells)

    md = (report / "report.md").read_text()
    assert "Margin over the best random-init seed" in md and "config hash" in md and "Wall time" in md
    assert "beats best" not in md  # the methods' margins carry no pass mark
    # one check per protocol: the reference against the best random-init seed of its network (a 4-step
    # reference need not pass it; the full smoke report must, `make smoke` runs `densessl check-report`)
    checks = json.loads((report / "checks.json").read_text())
    assert sorted(c["protocol"] for c in checks) == ["davis2017", "knn_imagenet", "linear_ade20k", "patchseg_coco"]
    assert all(c["run"] == "supervised/vit-tiny-p8-coco" and c["seeds"] == 3 for c in checks)
    assert "Check: the supervised reference beats the best random-init seed of its network" in md
    assert (report / "index.html").read_text().startswith("<!doctype html>")
    page = (report / "index.html").read_text()  # the plots of what the stages recorded (docs/report_plots.md)
    for figure in ("plot-pretrain-dino-vit-tiny-p8-imagenet", "plot-per-class-linear-ade20k", "plot-davis-sequences"):
        assert f"id='{figure}'" in page, figure
    logs = list((tmp_path / "results/smoke/logs").rglob("*.log"))
    assert len(logs) >= 3 + 1 + 4 + 8 + 1

    sidecar = json.loads((tmp_path / "results/smoke/pretrain/dino/vit-tiny-p8-imagenet/backbone.json").read_text())
    assert sidecar["provenance"]["git"]["commit"] and sidecar["source"]["kind"] == "pretrained"

    # Nothing left to do on a second invocation, with or without an explicit --configfile (the Snakefile's
    # own `configfile:` names the same file).
    again = snakemake(tmp_path, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    plain = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                            str(tmp_path), "-n"], capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and "Nothing to be done" in plain.stdout + plain.stderr, plain.stdout[-2000:]

    # A result made by other code (e.g. kept by Snakemake after a code edit) is named by the report.
    assert "made by other code than the rest" not in md
    metrics = tmp_path / "results/smoke/eval/patchseg_coco/dino/vit-tiny-p8-imagenet/metrics.json"
    stale = json.loads(metrics.read_text())
    stale["provenance"]["code"] = {"sha256": "0" * 64, "files": 1, "uncommitted": False}
    metrics.write_text(json.dumps(stale))
    rebuilt = subprocess.run([sys.executable, "-m", "densessl", "report", "--config", "config.yaml"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    md = (report / "report.md").read_text()
    assert "made by other code than the rest" in md and "evaluate patchseg_coco dino/vit-tiny-p8-imagenet (code 000000000000)" in md


TINY_TRAIN = {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0, "checkpoint_every_steps": 2}
ALL_METHODS = {
    "results_dir": "results",
    "threads": 1,
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"},
             {"method": "selfpatch", "arch": "vit-tiny-p8", "data": "imagenet"},
             {"method": "loca", "arch": "vit-tiny-p8", "data": "imagenet"},
             {"method": "gtsa", "arch": "vit-tiny-p8", "data": "coco"},
             {"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}],
    "random_init_seeds": [0],
    "evaluations": ["patchseg_coco"],
    "data": {"synthetic_size": "tiny"},
    "pretrain": {**{m: {"train": TINY_TRAIN} for m in ("dino", "selfpatch", "loca", "gtsa", "clove")},
                 "supervised": {"train": TINY_TRAIN, "arch": {"vit-tiny-p8": {"train": TINY_TRAIN}}}},
    "evaluate": {"patchseg": {"epochs": 1, "batch_size": 4, "warmup_steps": 2}},
}


@pytest.mark.e2e
def test_every_method_runs_through_the_dag(tmp_path):
    """Each registered method: pretrain → export (its own architecture variant) → Patch-Seg → report row."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(ALL_METHODS))
    run = snakemake(tmp_path, "--cores", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cells = json.loads((tmp_path / "results/smoke/report/tables.json").read_text())["results"]
    rows = {(c["method"], c["arch"]) for c in cells}
    for method in ("DINO", "SelfPatch", "LOCA", "GTSA"):
        assert (method, "ViT-Tiny/8 (smoke)") in rows
    assert ("CLoVE", "ResNet-Tiny (smoke)") in rows
    # the smoke preset's supervised references, each shown on the network of its random-init rows
    assert ("supervised reference", "ViT-Tiny/8 (smoke)") in rows
    assert ("supervised reference", "ResNet-Tiny (smoke), CLoVE init") in rows
    assert ("random init (seed0)", "ResNet-Tiny (smoke), CLoVE init") in rows  # CLoVE's zero-init residual
    for variant in ("SelfPatch", "LOCA"):  # each ViT variant has its own random-init rows
        assert ("random init (seed0)", f"ViT-Tiny/8 (smoke), {variant} variant") in rows
    loca = json.loads((tmp_path / "results/smoke/pretrain/loca/vit-tiny-p8-imagenet/backbone.json").read_text())
    assert loca["arch_kwargs"] == {"class_token": False, "gelu_tanh": True, "pos_resample": "scenic"}


def test_dvc_yaml_matches_the_configuration():
    generated = subprocess.run([sys.executable, "-m", "densessl", "dvc-yaml"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    assert (REPO / "dvc.yaml").read_text() == generated.stdout, "regenerate: python -m densessl dvc-yaml > dvc.yaml"
