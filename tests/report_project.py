"""A constructed results folder for the report's rendering tests: the files the stages write (pretraining
metrics.jsonl, evaluations' metrics.json, data manifests), with made-up values. These are test fixtures for
how the report draws what it reads, not results: no stage runs, so building the report takes a second."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import REPO

from densessl.config import Config, load_config
from densessl.train.run_log import METRICS_NAME, RunLog

CONFIG = {
    "preset": "smoke",
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
    "random_init_seeds": [0, 1],
    "evaluations": ["patchseg_coco", "linear_ade20k", "davis2017"],
    "baselines": {"supervised_reference": [{"arch": "vit-tiny-p8", "data": "coco"}]},
}
PATCHSEG = {"macro_recall": 0.2, "macro_f1_nanmean": 0.2, "macro_precision_nanmean": 0.2, "macro_f1": 0.2,
            "macro_precision": 0.2, "accuracy": 0.5}
NO_SEQUENCES = "random-init/vit-tiny-p8-seed1"  # its DAVIS metrics.json records no per-sequence scores


def write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make(tmp_path: Path, *, pretrain_logs: bool = True) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "results_dir": str(tmp_path / "results")}))
    cfg = load_config([path], root=REPO)
    for dataset in cfg.datasets:
        write(cfg.data_manifest(dataset), {"fingerprint": {"content_sha256": "0" * 64, "listing_sha256": None},
                                           "provenance": {"wall_s": 1.0}})
    if pretrain_logs:
        dino, supervised = cfg.pretrain_runs
        for run in (dino, supervised):  # written by the trainer's own writer, as a run writes them
            cfg.pretrain_dir(run).mkdir(parents=True, exist_ok=True)
        log = RunLog(cfg.pretrain_dir(dino), rank=0, tensorboard=False)
        for s in range(0, 20, 2):
            log.metrics({"step": s, "epoch": 0, "loss": 5.0 - 0.1 * s, "teacher_entropy": 2.0 - 0.05 * s,
                         "teacher_batch_entropy": 2.5})
        with open(cfg.pretrain_dir(dino) / METRICS_NAME, "a") as f:
            f.write('{"step": 20, "lo')  # a run killed mid-write: a torn last line
        RunLog(cfg.pretrain_dir(supervised), rank=0, tensorboard=False).metrics({"step": 0, "epoch": 0, "loss": 2.0})
    for index, (protocol, run) in enumerate(cfg.evaluation_jobs()):
        if protocol == "patchseg_coco":
            values: dict = dict(PATCHSEG)
        elif protocol == "linear_ade20k":
            values = {"mIoU": 3.0 + index, "mAcc": 1.0, "aAcc": 1.0,
                      "per_class_IoU": [10.0 + index, None, 30.0, 5.0 * index]}
        else:
            per_object = {"bear_1": {"J-Mean": 0.5, "F-Mean": 0.3}, "dogs_1": {"J-Mean": 0.2, "F-Mean": 0.4},
                          "dogs_2": {"J-Mean": 0.4, "F-Mean": 0.2 + 0.01 * index}}
            values = {"JF_mean": 35.0, "J_mean": 35.0, "F_mean": 35.0, "J-Mean": 0.35, "F-Mean": 0.35,
                      **({} if run.id == NO_SEQUENCES else {"per_object": per_object})}
        write(cfg.eval_metrics(protocol, run), {"metrics": values, "provenance": {"wall_s": 1.0}})
    return cfg
