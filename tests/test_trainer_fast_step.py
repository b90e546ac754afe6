"""The step settings: the deferred finiteness check, logs read at log steps, torch.compile, fused AdamW."""

from __future__ import annotations

import json

import pytest
import torch

from densessl.errors import ConfigError
from densessl.methods import get_method
from densessl.train import checkpointing
from densessl.train.finite_check import FiniteLossRecord
from densessl.train.optim import build_optimizer
from densessl.train.trainer import NonFiniteLossError, TrainConfig, Trainer

TINY = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)


def _trainer(images, out_dir, epochs=2, **cfg):
    torch.manual_seed(0)
    method = get_method("dino")("vit-tiny-p8", TINY, epochs=epochs)
    train = dict(epochs=epochs, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=0,
                 checkpoint_every_steps=1000, log_every_steps=1, precision="fp32", tensorboard=False)
    train.update(cfg)
    return Trainer(method, images, TrainConfig(**train), out_dir, device="cpu")


def _nan_at(trainer, step):
    """Make the loss of optimiser step ``step`` (0-based) NaN."""
    calls = {"n": 0}
    original = trainer.method.loss

    def loss(batch, epoch):
        value, logs = original(batch, epoch)
        calls["n"] += 1
        return (value * float("nan") if calls["n"] == step + 1 else value), logs

    trainer.method.loss = loss


def test_finite_loss_record_keeps_the_first_bad_step():
    record = FiniteLossRecord(torch.device("cpu"))
    record.note(torch.tensor(1.0), 0)
    assert record.read() == (None, 0.0)
    record.note(torch.tensor(float("inf")), 3)
    record.note(torch.tensor(float("nan")), 4)
    assert record.read() == (3, float("inf"))
    assert record.agree(stop=False, world=1) == (3, False)
    assert FiniteLossRecord(torch.device("cpu")).agree(stop=True, world=1) == (None, True)


@pytest.mark.parametrize("every", [1, 3, 100])
def test_nan_stops_the_run_before_a_later_checkpoint(tmp_path, random_images, every):
    """NaN at step 3, checkpoints every 2 steps: whatever the check interval, the error names step 3 and the
    newest checkpoint on disk is the one written after step 1 (step counter 2), never one after step 3."""
    trainer = _trainer(random_images, tmp_path, checkpoint_every_steps=2, finite_check_every=every)
    _nan_at(trainer, 3)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3 .*last finite checkpoint \\(step 2\\)"):
        trainer.fit()
    state = checkpointing.read_verified(tmp_path / "checkpoint.pt")
    assert state["epoch"] * trainer.iters_per_epoch + state["batch_in_epoch"] == 2
    assert (tmp_path / "checkpoint.diverged.pt").is_file()
    last = json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "failed" and "at step 3" in last["error"]


def test_the_loss_is_read_back_at_check_and_log_steps_only(tmp_path, random_images, monkeypatch):
    """8 steps, checks every 4, logs every 100 (step 0 and the last step log): two interval checks (after
    steps 3 and 7) plus one before each epoch-end checkpoint, and the loss read for 2 log lines."""
    trainer = _trainer(random_images, tmp_path, finite_check_every=4, log_every_steps=100)
    agreed, means = [], []
    real_agree, real_mean = FiniteLossRecord.agree, Trainer._mean_over_ranks
    monkeypatch.setattr(FiniteLossRecord, "agree", lambda self, *a: agreed.append(1) or real_agree(self, *a))
    monkeypatch.setattr(Trainer, "_mean_over_ranks", lambda self, loss: means.append(1) or real_mean(self, loss))
    summary = trainer.fit()
    assert summary["steps"] == 8 and len(agreed) == 4
    assert len(means) == 3  # steps 0 and 7 logged, and the summary's last loss
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 7]


def test_method_logs_may_be_tensors(tmp_path, random_images):
    trainer = _trainer(random_images, tmp_path, epochs=1)
    trainer.fit()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert isinstance(record["teacher_entropy"], float) and record["teacher_entropy"] > 0


def test_finite_check_every_must_be_positive(tmp_path, random_images):
    with pytest.raises(ConfigError, match="train.finite_check_every"):
        _trainer(random_images, tmp_path, finite_check_every=0)


def test_compiled_loss_matches_eager(tmp_path, random_images, monkeypatch):
    """train.compile traces the method's loss with dynamo; the aot_eager backend keeps this CPU test from
    spending minutes in inductor's C++ compiler while still running the traced graphs."""
    real_compile = torch.compile
    compiled = []

    def compile_aot_eager(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    losses = {}
    for flag in (False, True):
        trainer = _trainer(random_images, tmp_path / str(flag), epochs=1, compile=flag)
        trainer.fit(max_steps=2)
        losses[flag] = [json.loads(x)["loss"] for x in (tmp_path / str(flag) / "metrics.jsonl").read_text().splitlines()]
    assert len(compiled) == 1
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_fused_adamw_only_where_asked_and_only_for_adamw(tmp_path, random_images):
    trainer = _trainer(random_images, tmp_path)  # CPU: never fused, whatever fused_adamw says
    assert trainer.cfg.fused_adamw and not trainer.optimizer.defaults.get("fused")
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer("adamw", [{"params": params}], fused=True).defaults["fused"]
    assert not build_optimizer("adamw", [{"params": params}]).defaults.get("fused")
    sgd = build_optimizer("sgd", [{"params": params}], fused=True)
    assert isinstance(sgd, torch.optim.SGD) and not sgd.defaults.get("fused")


def test_step_settings_do_not_change_the_resume_identity(tmp_path, random_images):
    settings = {flag: checkpointing.run_settings("dino", None, TrainConfig(**{flag: value}), 16)
                for flag, value in (("compile", True), ("fused_adamw", False), ("finite_check_every", 1))}
    plain = checkpointing.run_settings("dino", None, TrainConfig(), 16)
    assert all(s == plain for s in settings.values())


def test_every_vit_attention_uses_fused_sdpa():
    """timm's Attention / CaiT ClassAttn take F.scaled_dot_product_attention only when ``fused_attn`` is set
    (TIMM_FUSED_ATTN unset): every attention in the ViT methods must, LOCA's cross-attention calls it directly."""
    settings = {"dino": TINY, "selfpatch": dict(TINY, out_dim_selfpatch=16, global_size=64, local_size=32)}
    for name, extra in settings.items():
        method = get_method(name)("vit-tiny-p8", extra, epochs=1)
        flags = [m.fused_attn for m in method.modules() if hasattr(m, "fused_attn")]
        assert flags and all(flags), name
