from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "densessl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_doctor_runs_torchvision_ops():
    out = run_cli("doctor")
    assert out.returncode == 0, out.stderr
    assert "nms and roi_align OK" in out.stdout


def test_bad_config_exits_2_with_field_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"runs": [{"method": "dino", "arch": "vit-z", "data": "imagenet"}]}))
    out = run_cli("targets", "--config", str(bad))
    assert out.returncode == 2
    assert "runs.0.arch" in out.stderr and "vit-tiny-p8" in out.stderr
    assert "Traceback" not in out.stderr


def test_convert_random_init_is_seeded(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    for _ in range(2):
        out = run_cli("convert", "--config", str(cfg), "--run", "random-init/vit-tiny-p8-seed1")
        assert out.returncode == 0, out.stderr
    weights = tmp_path / "results/smoke/pretrain/random-init/vit-tiny-p8-seed1/backbone.safetensors"
    first = weights.read_bytes()
    assert run_cli("convert", "--config", str(cfg), "--run", "random-init/vit-tiny-p8-seed1").returncode == 0
    assert weights.read_bytes() == first
    run_cli("convert", "--config", str(cfg), "--run", "random-init/vit-tiny-p8-seed2")
    other = tmp_path / "results/smoke/pretrain/random-init/vit-tiny-p8-seed2/backbone.safetensors"
    assert other.read_bytes() != first


def test_unknown_run_is_a_clear_error(tmp_path):
    out = run_cli("convert", "--run", "dino/vit-s16-imagenet")
    assert out.returncode == 2 and "not in the configuration" in out.stderr


def test_evaluate_any_timm_model_by_name(tmp_path):
    """Patch-Seg probes published backbones by timm name; a timm ViT with its own patch size and width."""
    import json

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "data": {"synthetic_size": "tiny"},
                                   "evaluate": {"patchseg": {"epochs": 1, "batch_size": 4, "warmup_steps": 1}}}))
    assert run_cli("data", "--config", str(cfg), "--dataset", "coco").returncode == 0
    out = tmp_path / "m.json"
    done = run_cli("evaluate", "patchseg_coco", "--config", str(cfg), "--timm-model", "vit_tiny_patch16_224",
                   "--out", str(out), "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["timm_model"] == "vit_tiny_patch16_224" and 0.0 <= result["metrics"]["macro_recall"] <= 1.0
    # normalised with the model's own timm mean/std (augreg: 0.5/0.5), as the benchmark does, not ImageNet's
    assert result["backbone"]["mean"] == result["metrics"]["mean"] == [0.5, 0.5, 0.5]
    assert result["backbone"]["std"] == [0.5, 0.5, 0.5] and result["backbone"]["img_size"] == 224
    bad = run_cli("evaluate", "patchseg_coco", "--config", str(cfg), "--timm-model", "no_such_model_xyz",
                  "--out", str(out))
    assert bad.returncode == 2 and "no_such_model_xyz" in bad.stderr


def test_feature_stats_before_any_data_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    out = run_cli("feature-stats", "--config", str(cfg))
    assert out.returncode == 2 and "run the data stage" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_timm_img_size_and_clip_normalisation(tmp_path):
    """In process: ``img_size`` reaches ``timm.create_model`` (the benchmark's DINOv2@224 entries) and a CLIP
    model is normalised with OpenAI CLIP's mean/std."""
    import json

    from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from densessl.config import load_config
    from densessl.errors import ConfigError
    from densessl.stages.data import run_data
    from densessl.stages.evaluate import run_evaluate_timm

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "data": {"synthetic_size": "tiny"},
                                    "evaluate": {"patchseg": {"epochs": 1, "batch_size": 4, "warmup_steps": 1,
                                                              "head": "linear"}}}))
    cfg = load_config([path], root=REPO)
    run_data(cfg, "coco")
    cases = [("vit_small_patch14_reg4_dinov2.lvd142m", 56, 14, IMAGENET_DEFAULT_MEAN, None),
             ("vit_base_patch16_clip_224.openai", 32, 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    for name, size, patch, mean, std in cases:
        out = run_evaluate_timm(cfg, "patchseg_coco", name, False, tmp_path / f"{patch}.json", "cpu", img_size=size)
        result = json.loads(out.read_text())
        assert result["backbone"]["img_size"] == result["metrics"]["img_size"] == size
        assert result["backbone"]["patch_size"] == patch and result["metrics"]["grid_size"] == size // patch
        assert result["backbone"]["mean"] == list(mean) and result["metrics"]["mean"] == list(mean)
        if std is not None:
            assert result["backbone"]["std"] == list(std)
    with pytest.raises(ConfigError, match="resnet18.*--img-size"):
        run_evaluate_timm(cfg, "patchseg_coco", "resnet18", False, tmp_path / "r.json", "cpu", img_size=64)
    with pytest.raises(ConfigError, match="resnet18.*patch tokens"):
        run_evaluate_timm(cfg, "patchseg_coco", "resnet18", False, tmp_path / "r.json", "cpu")
