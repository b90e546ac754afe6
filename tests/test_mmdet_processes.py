"""The mmdet protocols on several processes, as a GPU node runs them (one process per GPU), here on CPU over gloo.

The stage CLI starts the protocol's ``gpus`` torchrun workers; the toolkit trains with DDP and its distributed
sampler and gathers the test results across ranks; rank 0 alone writes metrics.json. A stop signal that reaches
one worker stops all of them after the same iteration with the checkpoint written, the launcher exits 3 (torchrun
itself exits 1 for any failed worker), and the next attempt resumes from that checkpoint. SyncBN, which torch
runs on CUDA tensors only, is refused on CPU processes before any starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from densessl.checkpoints.io import save_backbone
from densessl.config import load_config
from densessl.models.backbones import create_backbone
from densessl.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]
RUN = "clove/resnet-tiny-imagenet"


def _project(tmp: Path, protocol: str, dataset: str, **settings) -> tuple[Path, Path]:
    """A config file with ``protocol`` on 2 processes at tiny size, its data prepared and a backbone in place;
    returns (config file, metrics.json path)."""
    overrides = {"results_dir": str(tmp / "results"), "evaluations": [protocol],
                 "data": {"synthetic_size": "tiny"},
                 "evaluate": {protocol: {"gpus": 2, "batch_size_per_gpu": 1, "norm": "BN", "warmup_iters": 0,
                                         "schedules": {"1x": {"max_length": 2, "milestones": []}},
                                         "log_interval": 1, **settings}}}
    path = tmp / "processes.yaml"
    path.write_text(yaml.safe_dump(overrides))
    cfg = load_config([path], preset="smoke", root=ROOT)
    run = cfg.run(RUN)
    torch.manual_seed(0)
    save_backbone(cfg.backbone(run), create_backbone("resnet-tiny", zero_init_residual=True), "resnet-tiny",
                  {"zero_init_residual": True}, {"source": "test"})
    run_data(cfg, dataset)
    return path, cfg.eval_metrics(protocol, run)


def _env(tag: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
            "DENSESSL_TEST_TAG": tag}


def _evaluate(protocol: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "densessl", "evaluate", protocol, "--config", str(config), "--run", RUN,
            "--threads", "1"]


def _toolkit_log(work: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(work.rglob("*.log")))


def test_two_processes_train_and_evaluate(tmp_path):
    """Cityscapes: its evaluator writes per-image files on every rank and scores them on rank 0, beside mmdet's
    COCO-style AP (the test results of both ranks gathered)."""
    protocol = "maskrcnn_r50_fpn_cityscapes"
    config, metrics = _project(tmp_path, protocol, "cityscapes")
    done = subprocess.run(_evaluate(protocol, config), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    doc = json.loads(metrics.read_text())
    assert doc["settings"]["gpus"] == 2 and doc["metrics"], doc
    log = _toolkit_log(metrics.parent / "mmdet")
    assert "Distributed training: True" in log, "the toolkit ran as one distributed job"
    assert re.search(r"GPU number: 2|World size: 2", log), "over both processes"


def _worker(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker of this test (``DENSESSL_TEST_TAG``) with ``RANK=rank``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("DENSESSL_TEST_TAG") == tag and env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(proc.name)
    return None


def test_a_signal_to_one_worker_checkpoints_all_and_the_next_attempt_resumes(tmp_path):
    protocol = "fasterrcnn_r50_c4_voc"
    config, metrics = _project(tmp_path, protocol, "voc", schedules={"1x": {"max_length": 20, "milestones": []}})
    work = metrics.parent / "mmdet"
    tag = uuid.uuid4().hex
    launcher = subprocess.Popen(_evaluate(protocol, config), cwd=tmp_path, env=_env(tag), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"Iter\(train\) \[\s*3/20\]", _toolkit_log(work) if work.is_dir() else ""):
            assert launcher.poll() is None, launcher.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "training did not reach iteration 3"
            time.sleep(0.2)
        worker = _worker(tag, 1)
        assert worker is not None, "rank 1's worker process"
        os.kill(worker, signal.SIGUSR1)  # one worker only: the other learns it through the agreement
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 3, stderr[-4000:]
    assert "on another rank" in stderr, "rank 0, which got no signal, stopped for rank 1's"
    saved = Path((work / "last_checkpoint").read_text().strip())
    stopped_at = int(re.search(r"iter_(\d+)\.pth", saved.name).group(1))
    assert saved.is_file() and 3 <= stopped_at < 20
    assert not metrics.exists()

    again = subprocess.run(_evaluate(protocol, config), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed epoch: 0, iter: {stopped_at}" in _toolkit_log(work)
    assert json.loads(metrics.read_text())["metrics"]


def test_syncbn_on_cpu_processes_is_refused_before_any_starts(tmp_path):
    protocol = "maskrcnn_r50_fpn_coco"
    config, metrics = _project(tmp_path, protocol, "coco", norm="SyncBN")
    done = subprocess.run(_evaluate(protocol, config), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "norm: BN" in lines[0] and "SyncBN" in lines[0], done.stderr
    assert "torch.distributed.run" not in done.stderr and not metrics.exists()


def test_cpu_processes_get_a_wrapper_without_device_ids(monkeypatch, tmp_path):
    """mmengine's default DDP wrapper passes device_ids=[LOCAL_RANK], which DDP refuses for a CPU module."""
    from densessl.evaluate.transfer.mmengine_run import ToolkitRun, run_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = run_config({"find_unused_parameters": True}, ToolkitRun(work_dir=tmp_path, scope="mmdet"))
    assert cfg["launcher"] == "pytorch" and cfg["env_cfg"]["dist_cfg"]["backend"] == "gloo"
    assert cfg["model_wrapper_cfg"] == {"type": "MMDistributedDataParallel", "device_ids": None,
                                        "broadcast_buffers": False, "find_unused_parameters": True}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "model_wrapper_cfg" not in run_config({}, ToolkitRun(work_dir=tmp_path, scope="mmdet"))


def test_fewer_visible_gpus_than_the_protocol_asks_for_is_refused(monkeypatch):
    """Eight processes on a node with two GPUs would fail in mmengine's set_device; one line names the fix."""
    from densessl.errors import ConfigError
    from densessl.stages.evaluate import detection_nproc

    cfg = load_config([], preset="smoke", overrides={"evaluate": {"maskrcnn_r50_fpn_coco": {"gpus": 8}}}, root=ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"gpus 8 .* shows 2 GPU\(s\).*evaluate\.maskrcnn_r50_fpn_coco\.gpus"):
        detection_nproc(cfg, "maskrcnn_r50_fpn_coco")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert detection_nproc(cfg, "maskrcnn_r50_fpn_coco") == 8
