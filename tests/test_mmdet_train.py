"""One training iteration and one evaluation of every detection protocol at tiny size on CPU, through mmdet's
runner and the kept evaluators, on synthetic data in each dataset's real layout; plus the stage CLI path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densessl.checkpoints.io import save_backbone
from densessl.config import load_config
from densessl.data.synthetic import synthesize
from densessl.errors import ConfigError
from densessl.evaluate.transfer.mmdet_protocols import PROTOCOLS, DetectionConfig
from densessl.evaluate.transfer.mmdet_run import run_detection
from densessl.methods.base import build_dataclass
from densessl.models.backbones import create_backbone

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"vit": ("vit-tiny-p8", {}), "resnet": ("resnet-tiny", {"zero_init_residual": True})}
METRICS = {"coco": ("AP_bb", "AP_bb50", "AP_bb75", "AP_mk", "AP_mk50", "AP_mk75"),
           "lvis": ("AP_bb", "AP_mk", "APr", "APc", "APf"),
           "cityscapes": ("AP", "AP50", "AP_bb", "AP_mk"),
           "voc": ("AP", "AP50", "AP75")}


def _manifest(dataset: str, tmp: Path) -> Path:
    folder = tmp / "data" / dataset
    synthesize(dataset, folder / "files", "tiny", 0)
    if dataset == "cityscapes":
        from densessl.data.cityscapes import convert

        convert(folder / "files", folder / "annotations")
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"dataset": dataset, "root": "files"}))
    return manifest


def _backbone(family: str, tmp: Path) -> Path:
    arch, kwargs = ARCH[family]
    torch.manual_seed(0)
    path = tmp / f"{arch}.safetensors"
    save_backbone(path, create_backbone(arch, **kwargs), arch, kwargs, {"source": "test"})
    return path


def _settings(protocol: str, **overrides) -> DetectionConfig:
    cfg = load_config([], preset="smoke", root=ROOT)
    values = {**cfg.eval_settings(protocol), "schedules": {"1x": {"max_length": 1, "milestones": []}},
              "warmup_iters": 0, "num_workers": 0, **overrides}
    return build_dataclass(DetectionConfig, values, protocol)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_one_iteration_and_evaluation(protocol, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    info = PROTOCOLS[protocol]
    manifest = _manifest(info["dataset"], tmp_path)
    backbone = _backbone(info["backbones"][0], tmp_path)
    work = tmp_path / "work"
    metrics = run_detection(protocol, backbone, manifest, _settings(protocol), work, device="cpu", threads=1)
    for name in METRICS[info["evaluator"]]:
        assert name in metrics, f"{protocol}: {name} missing from {sorted(metrics)}"
        assert metrics[name] is None or 0.0 <= metrics[name] <= 100.0
    assert (work / "backbone_mmdet.safetensors").is_file()
    assert any(work.rglob("*.log")), "the toolkit's own log is kept in the work folder"


def test_refuses_a_process_count_other_than_the_published_one(tmp_path):
    manifest = _manifest("voc", tmp_path)
    backbone = _backbone("resnet", tmp_path)
    with pytest.raises(ConfigError, match="gpus is 8"):
        run_detection("fasterrcnn_r50_c4_voc", backbone, manifest, _settings("fasterrcnn_r50_c4_voc", gpus=8),
                      tmp_path / "work")
    vit = _backbone("vit", tmp_path)
    with pytest.raises(ConfigError, match="takes resnet backbones"):
        run_detection("fasterrcnn_r50_c4_voc", vit, manifest, _settings("fasterrcnn_r50_c4_voc"), tmp_path / "w")


def test_stage_writes_metrics_json_for_a_detection_protocol(tmp_path, monkeypatch):
    """``python -m densessl evaluate fasterrcnn_r50_c4_voc --run ...`` as the DAG calls it (data stage included)."""
    from densessl.stages.data import run_data
    from densessl.stages.evaluate import run_evaluate

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    protocol = "fasterrcnn_r50_c4_voc"
    overrides = {"results_dir": str(tmp_path / "results"), "evaluations": [protocol],
                 "data": {"synthetic_size": "tiny"},
                 "evaluate": {protocol: {"schedules": {"1x": {"max_length": 1, "milestones": []}}}}}
    cfg = load_config([], preset="smoke", overrides=overrides, root=ROOT)
    run = cfg.run("clove/resnet-tiny-imagenet")
    arch, kwargs = ARCH["resnet"]
    save_backbone(cfg.backbone(run), create_backbone(arch, **kwargs), arch, kwargs, {"source": "test"})
    run_data(cfg, "voc")
    out = run_evaluate(cfg, protocol, run.id, device="cpu")
    doc = json.loads(out.read_text())
    assert doc["protocol"] == protocol and doc["run"] == run.id
    assert {"AP", "AP50", "AP75"} <= set(doc["metrics"])
    assert (out.parent / "mmdet" / "backbone_mmdet.safetensors").is_file()
