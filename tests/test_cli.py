from __future__ import annotations

import subprocess
import sys

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
