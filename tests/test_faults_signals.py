"""A termination signal sent to the whole process group (what SLURM's time limit, `timeout` and Snakemake's
shutdown do), with DataLoader workers running: the run still checkpoints and exits with the requeue code, and
resuming gives the uninterrupted run. One test for pretraining, one for an evaluation's training loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

PRETRAIN = r'''
import sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from densessl.methods import get_method
from densessl.train.launch import launch
from densessl.train.trainer import TrainConfig, Trainer

out, ready = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
rng = np.random.default_rng(0)
images = [Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")) for _ in range(16)]
torch.manual_seed(0)
tiny = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)
method = get_method("dino")("vit-tiny-p8", tiny, epochs=2)
cfg = TrainConfig(epochs=2, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=int(sys.argv[3]),
                  checkpoint_every_steps=1000, log_every_steps=1, precision="fp32", tensorboard=False)
trainer = Trainer(method, images, cfg, out, device="cpu")
real, calls = method.loss, {"n": 0}

def loss(batch, epoch):
    calls["n"] += 1
    if calls["n"] == 3 and not ready.exists():
        ready.touch()
        time.sleep(3)  # the signal arrives while step 2 runs
    return real(batch, epoch)

method.loss = loss
sys.exit(launch(["pretrain"], 1, trainer.fit))
'''


def _start_and_signal(script: str, args: list[str], ready: Path, signum: int) -> subprocess.CompletedProcess:
    """Run ``script`` in its own process group; once it touches ``ready``, signal the whole group."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the step to signal"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # every process of the group: the trainer and its DataLoader workers
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_checkpoints_and_requeues(tmp_path: Path, signum: int) -> None:
    run = tmp_path / "run"
    done = _start_and_signal(PRETRAIN, [str(run), str(tmp_path / "ready"), "2"], tmp_path / "ready", signum)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "exiting with 3 (requeue)" in done.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 3)  # the step under way finished, nothing lost
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["event"] == "preempted" and attempts[-1]["signal"] == signal.Signals(signum).name
    if signum != signal.SIGTERM:
        return  # resuming does not depend on which signal stopped the run
    # the requeued job resumes (ready exists: no second signal) and gives the uninterrupted run's losses
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for folder in (run, tmp_path / "full"):
        subprocess.run([sys.executable, "-c", PRETRAIN, str(folder), str(tmp_path / "ready"), "0"], env=env,
                       check=True, capture_output=True)
    losses = [[json.loads(line)["loss"] for line in (f / "metrics.jsonl").read_text().splitlines()]
              for f in (run, tmp_path / "full")]
    assert len(losses[0]) == 8 and losses[0] == losses[1]


EVALUATION = r'''
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from test_linear_seg import smoke_cfg, write_ade
from densessl.evaluate import linear_seg
from densessl.models.backbones import create_backbone
from densessl.train.launch import launch

root, ready = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
if not (root / "ADEChallengeData2016").exists():
    write_ade(root)
real = linear_seg.poly_lr

def lr_then_wait(step, *args):
    if step == 2 and not ready.exists():
        ready.touch()
        time.sleep(3)  # the signal arrives while iteration 2 runs
    return real(step, *args)

linear_seg.poly_lr = lr_then_wait
torch.manual_seed(0)
cfg = smoke_cfg(iterations=6, checkpoint_every=100, max_val_items=2, num_workers=2)
sys.exit(launch(["evaluate"], 1, lambda: linear_seg.run_linear_seg(create_backbone("vit-tiny-p8"), root, cfg,
                                                                     state_path=root / "train_state.pt")))
'''


def test_signal_to_the_process_group_saves_an_evaluation_state(tmp_path: Path) -> None:
    """The Segmenter linear evaluation (a resume.py user) with 2 workers: state saved, exit 3."""
    done = _start_and_signal(EVALUATION, [str(tmp_path), str(tmp_path / "ready"), str(REPO / "tests")],
                             tmp_path / "ready", signal.SIGTERM)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "after iteration 3/6" in done.stderr
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["progress"]["step"] == 3
