"""The report's supervised-reference check and `densessl check-report`, which `make smoke` runs on its report:
the reference must beat the best random-init seed of its own network on every protocol."""

from __future__ import annotations

import json

import yaml
from conftest import REPO

from densessl.cli import main
from densessl.config import load_config
from densessl.report.build import build_report

PATCHSEG = {"macro_f1_nanmean": 0.2, "macro_precision_nanmean": 0.2, "macro_f1": 0.2, "macro_precision": 0.2,
            "accuracy": 0.5}


def _config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "smoke", "results_dir": str(tmp_path / "results"),
        "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}], "random_init_seeds": [0, 1],
        "evaluations": ["patchseg_coco", "linear_ade20k"],
        "baselines": {"supervised_reference": [{"arch": "vit-tiny-p8", "data": "coco"}]}}))
    return path, load_config([path], root=REPO)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _results(cfg, reference_miou):
    for dataset in cfg.datasets:
        _write(cfg.data_manifest(dataset), {"fingerprint": {"content_sha256": "0" * 64, "listing_sha256": None},
                                            "provenance": {"wall_s": 1.0}})
    recall = {"dino/vit-tiny-p8-imagenet": 0.19, "supervised/vit-tiny-p8-coco": 0.30,
              "random-init/vit-tiny-p8-seed0": 0.20, "random-init/vit-tiny-p8-seed1": 0.22}
    miou = {"dino/vit-tiny-p8-imagenet": 2.2, "supervised/vit-tiny-p8-coco": reference_miou,
            "random-init/vit-tiny-p8-seed0": 3.0, "random-init/vit-tiny-p8-seed1": 2.0}
    for protocol, run in cfg.evaluation_jobs():
        values = ({**PATCHSEG, "macro_recall": recall[run.id]} if protocol == "patchseg_coco"
                  else {"mIoU": miou[run.id], "mAcc": 1.0, "aAcc": 1.0})
        _write(cfg.eval_metrics(protocol, run), {"metrics": values, "provenance": {"wall_s": 1.0}})


def test_report_shows_the_check_and_check_report_fails_on_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    path, cfg = _config(tmp_path)
    _results(cfg, reference_miou=2.5)  # beats seed 1 (2.0), not the best seed (3.0)
    md = build_report(cfg).read_text()
    check = md.split("## Check: the supervised reference")[1].split("\n## ")[0]
    assert "| patchseg_coco macro_recall | supervised reference | ViT-Tiny/8 (smoke) | 0.30 | 0.22 (best of 2) | +0.08 | passes |" in check
    assert "| linear_ade20k mIoU | supervised reference | ViT-Tiny/8 (smoke) | 2.50 | 3.00 (best of 2) | -0.50 | FAILS |" in check
    # DINO's margin (below its random init here) is shown as measured, with no verdict
    patchseg = md.split("Patch-Seg probe")[1].split("\n## ")[0]
    assert "| DINO | ViT-Tiny/8 (smoke) | -0.03 (best of 2 seeds 0.22) |" in patchseg
    assert "beat" not in patchseg
    checks = json.loads((cfg.report_dir / "checks.json").read_text())
    assert [(c["protocol"], c["passed"]) for c in checks] == [("patchseg_coco", True), ("linear_ade20k", False)]

    assert main(["check-report", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "linear_ade20k: supervised/vit-tiny-p8-coco mIoU 2.5 vs best random-init seed 3.0: FAILS" in err
    assert "patchseg_coco" not in err

    _results(cfg, reference_miou=3.5)
    build_report(cfg)
    assert main(["check-report", "--config", str(path)]) == 0
    assert "beats the best random-init seed of its network on every protocol" in capsys.readouterr().out


def test_check_report_without_a_report_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    path, _ = _config(tmp_path)
    assert main(["check-report", "--config", str(path)]) == 2
    assert "build the report first" in capsys.readouterr().err


def test_a_protocol_can_show_its_check_without_failing_check_report(tmp_path, monkeypatch, capsys):
    """enforce_reference_check: false (a protocol whose smoke budget lets no network learn): the failed check is
    shown as such in the report and checks.json, and check-report passes on the others."""
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    path, _ = _config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["baselines"]["protocols"] = {"linear_ade20k": {"enforce_reference_check": False}}
    path.write_text(yaml.safe_dump(data))
    cfg = load_config([path], root=REPO)
    assert cfg.reference_check_enforced("patchseg_coco") and not cfg.reference_check_enforced("linear_ade20k")
    _results(cfg, reference_miou=2.5)
    md = build_report(cfg).read_text()
    assert "| -0.50 | fails (not enforced at this scale) |" in md
    checks = {c["protocol"]: c for c in json.loads((cfg.report_dir / "checks.json").read_text())}
    assert checks["linear_ade20k"]["enforced"] is False and checks["linear_ade20k"]["passed"] is False
    assert main(["check-report", "--config", str(path)]) == 0
    capsys.readouterr()
    data["baselines"]["protocols"] = {"linear_ade20k": {"enforce_reference_check": True}}
    path.write_text(yaml.safe_dump(data))
    assert main(["check-report", "--config", str(path)]) == 1
