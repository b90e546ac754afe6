"""Gradient accumulation in the trainer: a step over micro-batches equals the step over the whole batch (for a
loss that is a mean over images), resume stays exact, and the run records the plan it used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from densessl.methods.base import PretrainMethod
from densessl.train.trainer import TrainConfig, Trainer


class MeanLoss(PretrainMethod):
    """A linear student whose loss is a mean over images, so accumulation is exact up to rounding."""

    name = "toy-mean"
    config_cls = dict

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 4))
        self.teacher = None

    def views(self):  # noqa: ANN201
        return lambda image: torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).flatten() / 255

    def loss(self, batch, epoch):  # noqa: ANN001, ANN201
        out = self.student(batch)
        return ((out - 0.5) ** 2).mean(), {"out": float(out.detach().mean())}

    def export_backbone(self) -> nn.Module:
        return self.student


def _fit(images, out_dir, per_gpu, max_steps=None, method=None, **cfg):
    # SGD: an update proportional to the gradient, so a wrongly scaled accumulated gradient shows (Adam's would not)
    train = TrainConfig(epochs=2, batch_size=8, batch_size_per_gpu=per_gpu, lr=0.05, warmup_epochs=0,
                        num_workers=0, log_every_steps=1, precision="fp32", optimizer="sgd", clip_grad=0, **cfg)
    trainer = Trainer(method or MeanLoss(), images, train, out_dir, device="cpu")
    return trainer, trainer.fit(max_steps=max_steps)


def test_accumulated_steps_equal_whole_batch_steps(tmp_path, random_images):
    whole, whole_summary = _fit(random_images, tmp_path / "whole", per_gpu=8)
    accumulated, summary = _fit(random_images, tmp_path / "acc", per_gpu=4)
    assert (whole.accumulation, accumulated.accumulation) == (1, 2)
    assert whole.iters_per_epoch == accumulated.iters_per_epoch == 2  # 16 images / 8 per step
    for a, b in zip(whole.method.student.parameters(), accumulated.method.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert summary["batch_plan"]["accumulation_steps"] == 2 and summary["batch_plan"]["batch_size_per_gpu"] == 4
    assert summary["batch_plan"]["lr"] == pytest.approx(0.05 * 8 / 256) == whole_summary["batch_plan"]["lr"]
    state = torch.load(tmp_path / "acc" / "checkpoint.pt", weights_only=True)
    assert state["batch_plan"]["batch_size"] == 8 and state["settings"]["train"]["batch_size"] == 8


def test_resume_with_accumulation_continues_the_same_run(tmp_path, random_images):
    full, _ = _fit(random_images, tmp_path / "full", per_gpu=2)  # 4 micro-batches per step
    _fit(random_images, tmp_path / "resumed", per_gpu=2, max_steps=1)
    resumed, _ = _fit(random_images, tmp_path / "resumed", per_gpu=2)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "full", tmp_path / "resumed")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    for a, b in zip(full.method.student.parameters(), resumed.method.student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dino_trains_with_accumulation(tmp_path, random_images):
    from densessl.methods import get_method

    tiny = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)
    method = get_method("dino")("vit-tiny-p8", tiny, epochs=2)
    trainer, summary = _fit(random_images, tmp_path, per_gpu=4, method=method)
    assert summary["steps"] == 4 and trainer.accumulation == 2 and np.isfinite(summary["last_loss"])
