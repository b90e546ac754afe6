"""Progress lines where a user reads them: the pretraining stage's log file (the CLI run as Snakemake's rule
runs it, output redirected to a file), the trainer's resumed and throttled lines, and an evaluation's
training and inference loops. The download path's lines are tested with its loopback server in
test_datasets_download.py, mmengine's own lines in test_mmengine_run.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults_project import REPO, RUN, run_dir

from densessl import progress as progress_mod
from densessl.evaluate.linear_seg import LinearSegConfig, run_linear_seg
from densessl.methods import get_method
from densessl.models.backbones import create_backbone
from densessl.progress import INTERVAL_ENV
from densessl.train.trainer import TrainConfig, Trainer

NUM = r"[\d.]+(?:e[+-]\d+)?"
DUR = r"(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?"  # 42s, 6m32s, 4h21m, 3d04h


def _step_line(what: str, fields: str = "") -> str:
    return (rf"{what} step (\d+)/(\d+) \({NUM} %\) · {NUM} it/s · {NUM} img/s · elapsed {DUR} · ETA {DUR}"
            + fields)


@pytest.fixture
def log_file_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr is a log file (as under Snakemake), whatever runs the tests."""
    monkeypatch.setattr(progress_mod, "_stderr_is_tty", lambda: False)


def test_the_pretraining_stage_log_has_step_total_rate_and_eta_lines(project: Path) -> None:
    log = project / "pretrain.log"
    env = {**os.environ, INTERVAL_ENV: "0", "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                             os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:  # the rule's `> {log} 2>&1`
        code = subprocess.run([sys.executable, "-m", "densessl", "pretrain", "--config", str(project / "config.yaml"),
                               "--run", RUN], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=project,
                              timeout=600).returncode
    text = log.read_text()
    assert code == 0, text
    assert "\r" not in text  # no bar: plain lines
    pattern = re.compile(_step_line("pretrain dino", rf" · epoch (\d)/2 · loss {NUM} · lr {NUM}(?: · done in {DUR})?$"))
    found = [m for line in text.splitlines() if (m := pattern.search(line))]
    total = int(found[0].group(2))
    assert total == 8 and (run_dir(project) / "final.pt").is_file()
    # with interval 0: a line every step, then the closing line
    assert [int(m.group(1)) for m in found] == [*range(1, total + 1), total]
    assert "done in" in found[-1].group(0) and {m.group(3) for m in found} == {"1", "2"}


def _trainer(images, out_dir: Path) -> Trainer:
    torch.manual_seed(0)
    tiny = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)
    method = get_method("dino")("vit-tiny-p8", tiny, epochs=2)
    train = TrainConfig(epochs=2, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=0,
                        checkpoint_every_steps=1000, log_every_steps=1, precision="fp32")
    return Trainer(method, images, train, out_dir, device="cpu")


def test_a_resumed_run_counts_from_its_checkpoint_and_the_interval_throttles(
        tmp_path: Path, random_images, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        log_file_stderr: None) -> None:
    caplog.set_level(logging.INFO, logger="densessl.progress")
    monkeypatch.setenv(INTERVAL_ENV, "3600")  # far longer than the run: the first step and the end only
    _trainer(random_images, tmp_path).fit(max_steps=3)
    caplog.clear()
    _trainer(random_images, tmp_path).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "densessl.progress"]
    assert len(lines) == 2, lines
    assert re.fullmatch(_step_line("pretrain dino", rf" · epoch 1/2 · loss {NUM} · lr {NUM}"), lines[0]), lines[0]
    assert lines[0].startswith("pretrain dino step 4/8 (50.0 %)")
    assert lines[1].startswith("pretrain dino step 8/8 (100.0 %)") and " · epoch 2/2 · " in lines[1]
    assert re.search(rf" · done in {DUR}$", lines[1])


def test_an_evaluation_logs_its_training_and_inference_progress(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        log_file_stderr: None) -> None:
    from test_linear_seg import write_ade

    root = write_ade(tmp_path / "ade", n_train=4, n_val=2)
    caplog.set_level(logging.INFO, logger="densessl.progress")
    monkeypatch.setenv(INTERVAL_ENV, "0")
    torch.manual_seed(0)
    cfg = LinearSegConfig(crop_size=64, base_scale=(128, 64), iterations=3, batch_size=2, lr=0.01, eval_window=64,
                          eval_stride=64, finetune_backbone=False, max_val_items=2)
    run_linear_seg(create_backbone("vit-tiny-p8"), root, cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "densessl.progress"]
    train = [m for m in lines if re.fullmatch(_step_line("linear_seg train", rf" · loss {NUM} · lr {NUM}"
                                                                             rf"(?: · done in {DUR})?"), m)]
    assert [t.split(" (")[0] for t in train] == [f"linear_seg train step {i}/3" for i in (1, 2, 3, 3)]
    evals = [m for m in lines if m.startswith("linear_seg eval ")]
    assert re.fullmatch(rf"linear_seg eval image 2/2 \(100.0 %\) · {NUM} it/s · elapsed {DUR} · ETA 0s"
                        rf" · done in {DUR}", evals[-1]), evals
