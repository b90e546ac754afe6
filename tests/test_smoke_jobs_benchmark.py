"""benchmarks/smoke_jobs.py: per-kind sums, the critical path and the failed jobs, on a stand-in results folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("smoke_jobs", REPO / "benchmarks" / "smoke_jobs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["smoke_jobs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _job(results: Path, log: str, output: str | None, cpu: float, startup: float = 3.0) -> None:
    path = results / "logs" / f"{log}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"some progress\ndensessl cpu: stage={log.split('/')[0]} startup_s={startup} "
                    f"work_s={cpu - startup} cpu_s={cpu} user_s={cpu} sys_s=0 children_s=0 wall_s={2 * cpu}\n")
    if output:
        (results / output).parent.mkdir(parents=True, exist_ok=True)
        (results / output).write_text("x")


def test_summary_counts_finished_jobs_and_finds_the_longest_chain(tmp_path: Path) -> None:
    _job(tmp_path, "data/imagenet", "data/imagenet/manifest.json", 10)
    _job(tmp_path, "data/coco", "data/coco/manifest.json", 5, startup=0.3)
    _job(tmp_path, "pretrain/dino/vit-tiny-p8-imagenet", "pretrain/dino/vit-tiny-p8-imagenet/final.pt", 200)
    _job(tmp_path, "convert/dino/vit-tiny-p8-imagenet",
         "pretrain/dino/vit-tiny-p8-imagenet/backbone.safetensors", 4)
    _job(tmp_path, "convert/random-init/vit-tiny-p8-seed0",
         "pretrain/random-init/vit-tiny-p8-seed0/backbone.safetensors", 4)
    _job(tmp_path, "eval/patchseg_coco/dino/vit-tiny-p8-imagenet",
         "eval/patchseg_coco/dino/vit-tiny-p8-imagenet/metrics.json", 12)
    _job(tmp_path, "eval/patchseg_coco/random-init/vit-tiny-p8-seed0",
         "eval/patchseg_coco/random-init/vit-tiny-p8-seed0/metrics.json", 300)
    _job(tmp_path, "eval/maskrcnn_vit_fpn_coco/random-init/vit-tiny-p8-seed0", None, 3.5)  # failed
    smoke_jobs = _module()
    summary = smoke_jobs.summarise(smoke_jobs.read_jobs(tmp_path), cores=2)
    assert summary["jobs"] == 7 and summary["cpu_s"] == 535.0
    assert summary["failed_or_unfinished"] == ["eval/maskrcnn_vit_fpn_coco/random-init/vit-tiny-p8-seed0"]
    assert summary["kinds"]["eval/patchseg_coco"] == {"jobs": 2, "cpu_s": 312.0, "mean_cpu_s": 156.0,
                                                      "mean_startup_s": 3.0}
    # the random-init evaluation waits for the longer of its convert (4) and the COCO data (5), then 300 s,
    # longer than 10 + 200 + 4 + 12 through the pretraining
    assert summary["critical_path"] == ["data/coco", "eval/patchseg_coco/random-init/vit-tiny-p8-seed0"]
    assert summary["critical_path_s"] == 305.0
    assert summary["wall_lower_s"] == 305.0 and summary["wall_upper_s"] == 267.5 + 152.5
