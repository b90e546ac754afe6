"""The shared trainer: schedules, clipping, resume equality, preemption, non-finite loss."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from densessl.errors import ConfigError
from densessl.methods import get_method
from densessl.train.schedules import cosine_schedule
from densessl.train.trainer import (
    NonFiniteLossError,
    Preempted,
    TrainConfig,
    Trainer,
    clip_gradients,
    clip_gradients_per_parameter,
)

TINY = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)


def test_cosine_schedule_warmup_and_endpoints():
    s = cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=5, warmup_epochs=1)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], np.linspace(0, 1, 5))
    assert s[5] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.1 + 0.5 * 0.9 * (1 + np.cos(np.pi * 14 / 15)))
    assert np.all(np.diff(s[5:]) <= 0)


def test_clipping_is_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    module = torch.nn.Module()
    module.a, module.b = a, b
    clip_gradients_per_parameter(module, 1.0)
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))  # below the threshold: untouched


def test_global_norm_clipping_scales_all_gradients_together():
    """LOCA's clip_grads: one norm over every gradient ((3, 4) and (0, 12): 13), all scaled by clip / 13."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    module = torch.nn.Module()
    module.a, module.b = a, b
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    clip_gradients(module, 1.0, "global_norm")
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) / 13, rtol=1e-5)
    assert torch.allclose(b.grad, torch.tensor([0.0, 12.0]) / 13, rtol=1e-5)
    a.grad, b.grad = torch.tensor([0.3, 0.4]), torch.tensor([0.0, 0.1])  # norm 0.51 < 1: untouched
    clip_gradients(module, 1.0, "global_norm")
    assert torch.equal(a.grad, torch.tensor([0.3, 0.4])) and torch.equal(b.grad, torch.tensor([0.0, 0.1]))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])  # per parameter: each to norm 1
    clip_gradients(module, 1.0, "per_parameter")
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5) and b.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_unknown_clip_mode_is_refused(tmp_path, random_images):
    with pytest.raises(ConfigError, match="train.clip_mode"):
        _trainer(random_images, tmp_path, clip_mode="global")


def _trainer(images, out_dir, epochs=2, **cfg):
    torch.manual_seed(0)
    method = get_method("dino")("vit-tiny-p8", TINY, epochs=epochs)
    train = TrainConfig(epochs=epochs, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=0,
                        checkpoint_every_steps=1000, log_every_steps=1, precision="fp32", **cfg)
    return Trainer(method, images, train, out_dir, device="cpu")


def _losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_the_exact_same_run(tmp_path, random_images):
    full = tmp_path / "full"
    _trainer(random_images, full).fit()
    resumed = tmp_path / "resumed"
    _trainer(random_images, resumed).fit(max_steps=3)  # stops mid-epoch 0 (4 steps per epoch)
    _trainer(random_images, resumed).fit()            # a fresh process would do exactly this
    a, b = _losses(full), _losses(resumed)
    assert len(a) == len(b) == 8
    assert a == b
    attempts = [json.loads(line) for line in (resumed / "attempts.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in attempts] == [("start", 0), ("paused", 3), ("start", 3), ("finished", 8)]
    assert [r.get("resumed") for r in attempts] == [False, None, True, None]


def test_sigterm_saves_checkpoint_and_raises_preempted(tmp_path, random_images):
    trainer = _trainer(random_images, tmp_path)
    original = trainer.method.loss

    def loss_then_signal(batch, epoch):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(batch, epoch)

    trainer.method.loss = loss_then_signal
    with pytest.raises(Preempted):
        trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["batch_in_epoch"] == 1 and state["epoch"] == 0
    last = json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "preempted" and last["step"] == 1 and last["signal"] == "SIGTERM"


def test_non_finite_loss_names_the_step(tmp_path, random_images):
    trainer = _trainer(random_images, tmp_path)
    calls = {"n": 0}
    original = trainer.method.loss

    def nan_at_step_two(batch, epoch):
        loss, logs = original(batch, epoch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    trainer.method.loss = nan_at_step_two
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.fit()
    last = json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "failed" and "NonFiniteLossError" in last["error"] and "at step 2" in last["error"]


def test_batch_larger_than_dataset_is_a_clear_error(tmp_path, random_images):
    with pytest.raises(Exception, match="larger than the dataset"):
        _trainer(random_images[:3], tmp_path)


@pytest.mark.parametrize(("device", "world", "local_rank", "cuda", "expected"), [
    (None, 1, 0, False, "cpu"),
    (None, 1, 0, True, "cuda:0"),
    ("cuda", 1, 0, True, "cuda:0"),      # a bare "cuda" gets an index: torch.cuda.set_device needs one
    ("cuda", 4, 3, True, "cuda:3"),      # under torchrun: this rank's own GPU
    (None, 4, 2, True, "cuda:2"),
    ("cuda:1", 1, 0, True, "cuda:1"),    # an explicit index is kept
    ("cpu", 2, 1, True, "cpu"),
])
def test_pick_device(device, world, local_rank, cuda, expected):
    from densessl.train.trainer import pick_device

    assert pick_device(device, world, local_rank, cuda) == torch.device(expected)
