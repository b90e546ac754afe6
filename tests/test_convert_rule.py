"""The Snakemake convert rule reruns when what determines an exported backbone changes, and only then.

A released entry's settings (url, sha256, path, format, options) are not input files; without a ``settings``
param, changing e.g. ``options.checkpoint_key`` left the old backbone.safetensors "up to date".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import REPO

from densessl.models.backbones import create_backbone

TARGET = "results/smoke/pretrain/dino/vit-tiny-p8-imagenet-released/backbone.safetensors"


def _dino_training_checkpoint(path: Path) -> None:
    """DINO's training-checkpoint layout: teacher (``backbone.*``) and DDP student (``module.backbone.*``)."""
    torch.manual_seed(0)
    teacher = {f"backbone.{k}": v.clone() for k, v in create_backbone("vit-tiny-p8").state_dict().items()}
    student = {f"module.{k}": v + 1.0 for k, v in teacher.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, path)


def _write_config(workdir: Path, checkpoint: Path, checkpoint_key: str) -> None:
    released = {"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet", "format": "dino",
                "path": str(checkpoint), "options": {"checkpoint_key": checkpoint_key}}
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "results_dir": "results", "threads": 1, "runs": [], "random_init_seeds": [0], "evaluations": [],
        "released": [released]}))


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(workdir / "config.yaml"), *args, TARGET],
                          capture_output=True, text=True, timeout=300)


def test_changing_a_released_option_reruns_convert(tmp_path: Path) -> None:
    checkpoint = tmp_path / "dino_official.pth"
    _dino_training_checkpoint(checkpoint)
    _write_config(tmp_path, checkpoint, "teacher")
    built = _snakemake(tmp_path, "--cores", "1")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert (tmp_path / TARGET).is_file()

    same = _snakemake(tmp_path, "-n")  # the settings hash is stable across invocations
    assert same.returncode == 0 and "Nothing to be done" in same.stdout + same.stderr, same.stdout[-2000:]

    # one more override file that leaves this job's settings as they are: the config file list is not a param
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"random_init_seeds": [0, 1]}))
    extra = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                            str(tmp_path), "-n", TARGET, "--configfile", str(tmp_path / "config.yaml"),
                            str(tmp_path / "extra.yaml")], capture_output=True, text=True, timeout=300)
    log = extra.stdout + extra.stderr
    assert extra.returncode == 0 and "Nothing to be done" in log, log[-2000:]

    _write_config(tmp_path, checkpoint, "student")
    changed = _snakemake(tmp_path, "-n")
    log = changed.stdout + changed.stderr
    assert changed.returncode == 0, log[-2000:]
    assert "Nothing to be done" not in log and "rule convert" in log, log[-2000:]
    assert "Params have changed since last execution" in log, log[-2000:]
