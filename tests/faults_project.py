"""A tiny densessl project on disk for the fault tests: synthetic 'tiny' ImageNet, one tiny DINO run, driven
through the CLI entry point exactly as Snakemake's shell command would call it (in this process, so each call
costs milliseconds of start-up instead of seconds). The ``tiny_data`` and ``project`` fixtures are in
conftest.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from densessl.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN = "dino/vit-tiny-p8-imagenet"
TINY_DINO = {"out_dim": 16, "hidden_dim": 32, "bottleneck_dim": 8, "global_size": 32, "local_size": 16,
             "local_crops_number": 1, "use_bn_in_head": False}
TINY_TRAIN = {"epochs": 2, "batch_size_per_gpu": 4, "lr": 1.0e-3, "warmup_epochs": 1, "num_workers": 0,
              "checkpoint_every_steps": 2, "log_every_steps": 1, "tensorboard": False}


def write_config(folder: Path, train: dict | None = None, **top: object) -> Path:
    data = {"preset": "smoke", "results_dir": str(folder / "results"), "threads": 1,
            "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
            "random_init_seeds": [], "evaluations": [], "data": {"synthetic_size": "tiny"},
            "pretrain": {"dino": {"method": TINY_DINO, "train": {**TINY_TRAIN, **(train or {})}}}, **top}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_dir(folder: Path) -> Path:
    return folder / "results" / "smoke" / "pretrain" / "dino" / "vit-tiny-p8-imagenet"


def cli(config: Path, *args: str) -> int:
    stage, *rest = args
    return main([stage, "--config", str(config), *rest])
