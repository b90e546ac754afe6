"""Trainer hooks: optimiser choice, method param groups, TensorBoard scalars, metric truncation, resume guards."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from densessl.errors import ConfigError, DenseSSLError
from densessl.methods.dino import DINO
from densessl.train.trainer import TrainConfig, Trainer, resolve_optimizer_name

TINY = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)


class LarsDINO(DINO):
    """DINO that asks for LARS, as CLoVE does (not registered)."""

    optimizer_name = "lars"


class GroupedDINO(DINO):
    """DINO whose head trains at half the lr and whose backbone keeps a fixed weight decay of 0.01."""

    def param_groups(self):
        head = [p for n, p in self.student.named_parameters() if n.startswith("head.") and p.requires_grad]
        body = [p for n, p in self.student.named_parameters() if not n.startswith("head.") and p.requires_grad]
        return [{"params": head, "lr_scale": 0.5}, {"params": body, "weight_decay": 0.01, "wd_schedule": False}]


def _trainer(images, out_dir, cls=DINO, **cfg):
    torch.manual_seed(0)
    method = cls("vit-tiny-p8", TINY, epochs=2)
    settings = dict(epochs=2, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=0,
                    checkpoint_every_steps=1000, log_every_steps=1, precision="fp32")
    settings.update(cfg)
    return Trainer(method, images, TrainConfig(**settings), out_dir, device="cpu")


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_optimizer_resolution_order():
    assert TrainConfig().optimizer is None
    assert resolve_optimizer_name(None, DINO) == "adamw"       # no method default: DINO's adamw
    assert resolve_optimizer_name(None, LarsDINO) == "lars"    # the method's default
    assert resolve_optimizer_name("sgd", LarsDINO) == "sgd"    # an explicit setting wins
    with pytest.raises(ConfigError, match="train.optimizer: 'adam'"):
        resolve_optimizer_name("adam", DINO)


def test_method_optimizer_name_builds_lars(tmp_path, random_images):
    from densessl.train.lars import LARS

    trainer = _trainer(random_images, tmp_path, cls=LarsDINO)
    assert isinstance(trainer.optimizer, LARS) and trainer.optimizer_name == "lars"
    assert isinstance(_trainer(random_images, tmp_path / "b", cls=LarsDINO, optimizer="adamw").optimizer,
                      torch.optim.AdamW)


def test_lars_unavailable_is_a_clear_error(tmp_path, random_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "densessl.train.lars", None)  # makes `from ... import LARS` fail
    with pytest.raises(ConfigError, match="'lars' needs densessl.train.lars.LARS"):
        _trainer(random_images, tmp_path, cls=LarsDINO)


def test_param_groups_hook_scales_lr_and_fixes_weight_decay(tmp_path, random_images):
    trainer = _trainer(random_images, tmp_path, cls=GroupedDINO, weight_decay=0.04, weight_decay_end=0.4)
    trainer.fit(max_steps=2)
    # step 1 of a 1-epoch warm-up over 4 iterations: lr = linspace(0, 1e-3 · 4/256, 4)[1]
    peak = 1e-3 * 4 / 256
    head, body = trainer.optimizer.param_groups
    assert head["lr"] == pytest.approx(0.5 * peak / 3)
    assert body["lr"] == pytest.approx(peak / 3)
    assert head["weight_decay"] == pytest.approx(float(trainer.wd_schedule[1]))  # scheduled (> 0.04)
    assert head["weight_decay"] > 0.04
    assert body["weight_decay"] == 0.01                                        # fixed by the method


def test_param_groups_hook_must_cover_the_student(tmp_path, random_images):
    class Incomplete(DINO):
        def param_groups(self):
            return [{"params": [p for n, p in self.student.named_parameters() if n.startswith("head.")]}]

    class Foreign(DINO):
        def param_groups(self):
            return [{"params": [p for p in self.student.parameters() if p.requires_grad]},
                    {"params": [torch.nn.Parameter(torch.zeros(3))]}]

    with pytest.raises(DenseSSLError, match="leaves out trainable student parameters"):
        _trainer(random_images, tmp_path, cls=Incomplete)
    with pytest.raises(DenseSSLError, match="not a parameter of method.student"):
        _trainer(random_images, tmp_path, cls=Foreign)


def test_tensorboard_scalars_match_the_jsonl(tmp_path, random_images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(random_images, tmp_path).fit(max_steps=3)
    records = _records(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "teacher_entropy"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [0, 1, 2]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert _trainer(random_images, tmp_path / "off", tensorboard=False).fit(max_steps=1)
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, random_images):
    _trainer(random_images, tmp_path).fit(max_steps=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a run killed after logging steps 2-3, before saving
        f.write(json.dumps({"step": 2, "loss": 99.0}) + "\n" + json.dumps({"step": 3, "loss": 99.0}) + "\n")
    _trainer(random_images, tmp_path).fit(max_steps=2)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert 99.0 not in [r["loss"] for r in records]


def test_resume_refuses_another_world_size_or_optimizer(tmp_path, random_images):
    _trainer(random_images, tmp_path).fit(max_steps=1)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["world_size"] == 1 and state["optimizer_name"] == "adamw"
    torch.save({**state, "world_size": 2}, path)
    with pytest.raises(DenseSSLError, match="written by a run on 2 process"):
        _trainer(random_images, tmp_path).fit()
    torch.save(state, path)
    with pytest.raises(DenseSSLError, match="optimiser state of 'adamw'"):
        _trainer(random_images, tmp_path, optimizer="sgd").fit()
