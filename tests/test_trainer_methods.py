"""The shared trainer with every registered method: resume equality, frozen last layer, periodic checkpoints,
teacher-temperature schedule.

Every method runs at smoke scale on CPU (vit-tiny-p8 / resnet-tiny, 16 random 64-px images, batch 4 → 4 steps per
epoch), small enough that one full resume comparison takes about a second.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import densessl.train.trainer as trainer_module
from densessl.methods import get_method
from densessl.methods.dino import DINOLoss
from densessl.train.schedules import teacher_temperature_schedule
from densessl.train.trainer import TrainConfig, Trainer

# The smallest settings the method tests use, with the features whose state must survive a resume switched on:
# teacher-temperature warm-up (the loss changes with the epoch), BatchNorm in the DINO head, drop path and
# token dropping (randomness re-seeded per step), GTSA's patch-correspondence loss from epoch 1 on.
TEMPS = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
METHODS = {
    "dino": ("vit-tiny-p8", dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16,
                                 local_crops_number=1, use_bn_in_head=True, **TEMPS)),
    "selfpatch": ("vit-tiny-p8", dict(out_dim=16, out_dim_selfpatch=8, hidden_dim=32, bottleneck_dim=8,
                                      global_size=32, local_size=24, local_crops_number=1, **TEMPS)),
    "loca": ("vit-tiny-p8", dict(head_hidden_dim=32, head_bottleneck_dim=8, head_output_dim=16, reference_size=32,
                                 query_size=32, focal_size=16, num_focal_queries=1, query0_keep_tokens=6)),
    "gtsa": ("vit-tiny-p8", dict(global_size=32, local_size=16, local_crops_number=1, projector_dim=16, out_dim=16,
                                 predictor_dim=16, rot_hidden_dim=16, rot_bottleneck_dim=8, roi_out_size=(3, 2),
                                 num_matches=(8, 2), pc_warmup_epochs=0)),
    "clove": ("resnet-tiny", dict(projector_hidden_dim=64, projector_out_dim=32, attn_heads=4, global_size=64,
                                  local_size=32, local_crops_number=1)),
}
EPOCHS, STEPS_PER_EPOCH = 2, 4


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(16)]


def _trainer(name: str, images, out_dir, method_overrides: dict | None = None, **cfg) -> Trainer:
    arch, settings = METHODS[name]
    torch.manual_seed(0)
    method = get_method(name)(arch, dict(settings, **(method_overrides or {})), epochs=EPOCHS)
    train = dict(epochs=EPOCHS, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=0,
                 checkpoint_every_steps=1000, log_every_steps=1, precision="fp32", tensorboard=False)
    train.update(cfg)
    return Trainer(method, images, TrainConfig(**train), out_dir, device="cpu")


def _records(out_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput (the only field allowed to differ between runs)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def _final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Student and teacher state (parameters and buffers: BN statistics), method extra state (centres) and
    every tensor of the optimiser state (AdamW moments, LARS momentum buffers)."""
    state = trainer.state_dict()
    out = {f"student.{k}": v for k, v in state["student"].items()}
    out.update({f"teacher.{k}": v for k, v in state["teacher"].items()})
    out.update({f"extra.{k}": v for k, v in state["extra"].items()})
    for index, param_state in state["optimizer"]["state"].items():
        out.update({f"optimizer.{index}.{k}": v for k, v in param_state.items() if isinstance(v, torch.Tensor)})
    return out


# ------------------------------------------------------------------------------------------------ 1. resume
@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_continues_the_exact_same_run_for_every_method(name, images, tmp_path):
    """Three interruptions (mid-epoch 0, at its end, mid-epoch 1: across the epoch where DINO's last layer
    unfreezes and the teacher temperature changes) and fresh Trainers give the uninterrupted run's every logged
    number, bit for bit (as tests/test_trainer.py's DINO resume test), and its final weights, buffers and
    optimiser state."""
    # One loader worker: the augmentations then run in another process, so the main process's RNG (drop path,
    # LOCA's token dropping) is not re-seeded by SeededAugmentation and only the trainer's per-step seed makes
    # the step reproducible (with num_workers=0 the per-item seeding would hide its absence).
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = _trainer(name, images, full_dir, num_workers=1)
    assert full.iters_per_epoch == STEPS_PER_EPOCH
    full.fit()

    for more, stopped_at in [(3, 3),   # mid-epoch 0
                             (1, 4),   # exactly at the end of epoch 0 (the checkpoint holds batch_in_epoch 4)
                             (2, 6)]:  # mid-epoch 1
        summary = _trainer(name, images, resumed_dir, num_workers=1).fit(max_steps=more)
        assert summary["stopped_at_step"] == stopped_at
    resumed = _trainer(name, images, resumed_dir, num_workers=1)
    assert resumed.fit()["steps_this_run"] == 2

    a, b = _records(full_dir), _records(resumed_dir)
    assert [r["step"] for r in a] == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert all(math.isfinite(r["loss"]) for r in a)
    assert len({r["loss"] for r in a}) > 1  # the run does move (guards against comparing constants)
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb, (name, ra["step"])

    sa, sb = _final_state(full), _final_state(resumed)
    assert sa.keys() == sb.keys()
    assert any(k.startswith("optimizer.") for k in sa)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), (name, key)


# ------------------------------------------------------------------------------------------ 2. frozen last layer
@pytest.mark.parametrize("name", ["dino", "selfpatch"])
def test_train_step_in_epoch_zero_freezes_last_layer_and_moves_teacher_by_ema_only(name, images, tmp_path):
    """``freeze_last_layer=1``: in epoch 0 cancel_gradients drops the last layer's gradients, so AdamW skips it
    (a zeroed instead of dropped gradient would still let weight decay move it). Everything else the student
    trains moves; the teacher gets no gradient and equals m·θ_t + (1 − m)·θ_s exactly."""
    trainer = _trainer(name, images, tmp_path, warmup_epochs=0, weight_decay=0.04)  # lr at step 0 is the peak
    assert trainer.epoch == 0 and trainer.method.cfg.freeze_last_layer == 1
    assert float(trainer.lr_schedule[0]) > 0
    student, teacher = trainer.method.student, trainer.method.teacher
    student_before = {k: p.detach().clone() for k, p in student.named_parameters()}
    teacher_before = {k: p.detach().clone() for k, p in teacher.named_parameters()}
    batch = next(iter(trainer._loader()))

    loss, _, stop = trainer.train_step(batch, 0)
    assert math.isfinite(loss) and not stop

    last = [k for k in student_before if "last_layer" in k]
    trainable_last = [k for k in last if dict(student.named_parameters())[k].requires_grad]
    assert trainable_last  # weight-normalised direction (original1) of every DINO head's last layer
    expected_heads = 1 if name == "dino" else 2  # SelfPatch: c_head and p_head
    assert len([k for k in trainable_last if k.endswith("original1")]) == expected_heads
    for key, p in student.named_parameters():
        if key in last:
            assert torch.equal(p, student_before[key]), f"{key} moved in epoch 0"
        elif p.requires_grad:
            assert not torch.equal(p, student_before[key]), f"{key} did not train"

    momentum = float(trainer.momentum_schedule[0])
    assert 0 < momentum < 1
    students = dict(student.named_parameters())
    for key, p in teacher.named_parameters():
        assert p.grad is None and not p.requires_grad, key
        expected = teacher_before[key].clone().mul_(momentum).add_(students[key].detach(), alpha=1 - momentum)
        assert torch.equal(p, expected), key


# ------------------------------------------------------------------------------------- 3. periodic checkpoints
def test_checkpoint_every_steps_writes_mid_epoch_checkpoints(images, tmp_path, monkeypatch):
    """checkpoint_every_steps=2 in a 4-step epoch: a checkpoint at step 2 (not an epoch end), then the
    max_steps one at 3; with the default (1000) only the max_steps one."""
    saved: list[tuple[int, int, int]] = []  # (trainer.step, epoch on disk, batch_in_epoch on disk)
    real_save = Trainer.save_checkpoint

    def recording_save(self, path=None):
        written = real_save(self, path)
        state = torch.load(written, weights_only=True)
        saved.append((self.step, state["epoch"], state["batch_in_epoch"]))
        return written

    monkeypatch.setattr(Trainer, "save_checkpoint", recording_save)
    _trainer("dino", images, tmp_path / "every2", checkpoint_every_steps=2).fit(max_steps=3)
    assert saved == [(2, 0, 2), (3, 0, 3)]
    saved.clear()
    _trainer("dino", images, tmp_path / "default").fit(max_steps=3)
    assert saved == [(3, 0, 3)]


def test_run_killed_after_a_periodic_checkpoint_resumes_from_it(images, tmp_path, monkeypatch):
    """A run that dies at step 3 (an exception, no checkpoint of its own) leaves the step-2 checkpoint written
    by checkpoint_every_steps=2; a fresh Trainer resumes there and reproduces the uninterrupted run."""
    _trainer("dino", images, tmp_path / "full", checkpoint_every_steps=2).fit()

    killed_dir = tmp_path / "killed"
    killed = _trainer("dino", images, killed_dir, checkpoint_every_steps=2)
    original, calls = killed.method.loss, {"n": 0}

    def die_at_step_three(batch, epoch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return original(batch, epoch)

    killed.method.loss = die_at_step_three
    with pytest.raises(RuntimeError, match="killed"):
        killed.fit()
    state = torch.load(killed_dir / trainer_module.CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2)
    assert [r["step"] for r in _records(killed_dir)] == [0, 1, 2]  # step 2 logged after the checkpoint

    resumed = _trainer("dino", images, killed_dir, checkpoint_every_steps=2)
    assert resumed.fit()["steps_this_run"] == EPOCHS * STEPS_PER_EPOCH - 2
    assert _records(killed_dir) == _records(tmp_path / "full")


# --------------------------------------------------------------------------------------- 4. teacher temperature
def test_teacher_temperature_schedule_hand_computed():
    """DINO ``DINOLoss.__init__``: linspace(warmup_temp, temp, warmup_epochs) then temp for the remaining
    epochs. The official code indexes it per *epoch* (``self.teacher_temp_schedule[epoch]``,
    facebookresearch/dino ``main_dino.py``), not per iteration."""
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 3, 5), [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 4, 6),
                               [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 0, 3), [0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 3, 2), [0.04, 0.055])  # run shorter
    assert len(teacher_temperature_schedule(0.02, 0.04, 30, 100)) == 100


def _dino_loss_by_hand(s: np.ndarray, t: np.ndarray, center: float, temp: float, crops: int, batch: int) -> float:
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    total, pairs = 0.0, 0
    for iq in range(2):
        q = softmax((t[iq * batch:(iq + 1) * batch] - center) / temp)
        for v in range(crops):
            if v != iq:
                total += float(np.mean(np.sum(-q * np.log(softmax(s[v * batch:(v + 1) * batch] / 0.1)), -1)))
                pairs += 1
    return total / pairs


def test_dino_loss_uses_the_epochs_teacher_temperature():
    torch.manual_seed(0)
    batch, dim, crops = 2, 5, 3
    student, teacher = torch.randn(crops * batch, dim), torch.randn(2 * batch, dim)
    temps = teacher_temperature_schedule(0.04, 0.07, 3, 5)  # [0.04, 0.055, 0.07, 0.07, 0.07]
    s, t = student.numpy(), teacher.numpy()
    values = {}
    for epoch, temp in [(0, 0.04), (1, 0.055), (2, 0.07), (4, 0.07), (9, 0.07)]:  # 9: past the end → last value
        loss_fn = DINOLoss(dim, crops, temps, student_temp=0.1, center_momentum=0.9)
        loss_fn.center.fill_(0.25)  # a fresh loss per epoch: forward moves the centre
        loss, logs = loss_fn(student, teacher, epoch=epoch)
        assert logs["teacher_temp"] == pytest.approx(temp)
        assert loss.item() == pytest.approx(_dino_loss_by_hand(s, t, 0.25, temp, crops, batch), rel=1e-5)
        values[epoch] = loss.item()
    assert abs(values[0] - values[1]) > 1e-3 and abs(values[1] - values[2]) > 1e-3  # the temperature matters
    assert values[2] == values[4] == values[9]


def test_selfpatch_patch_loss_uses_the_epochs_teacher_temperature():
    """SelfPatch's patch loss sharpens the teacher's neighbour aggregates with the same per-epoch temperature."""
    from densessl.methods.selfpatch import SelfPatchLoss

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    torch.manual_seed(0)
    batch, crops, patches, dim = 2, 3, 4, 6
    student_cls, teacher_cls = torch.randn(crops * batch, 5), torch.randn(crops * batch, 5)
    student_patches = [torch.randn(batch, patches, dim) for _ in range(crops)]
    teacher_patches = [torch.randn(batch, patches, dim) for _ in range(crops)]
    temps = teacher_temperature_schedule(0.04, 0.07, 3, 5)
    values = {}
    for epoch, temp in [(0, 0.04), (1, 0.055), (3, 0.07)]:
        loss_fn = SelfPatchLoss(5, dim, crops, temps, student_temp=0.1, center_momentum=0.9, patch_loss_weight=0.1,
                                center_from_all_crops=True)
        loss_fn.patch_center.fill_(0.3)
        _, logs = loss_fn(student_cls, teacher_cls, student_patches, teacher_patches, epoch)
        expected = np.mean([np.mean(np.sum(-softmax((t.numpy() - 0.3) / temp)
                                           * np.log(softmax(s.numpy() / 0.1)), -1))
                            for s, t in zip(student_patches, teacher_patches)])
        assert logs["patch_loss"] == pytest.approx(float(expected), rel=1e-5), epoch
        values[epoch] = logs["patch_loss"]
    assert abs(values[0] - values[1]) > 1e-3 and abs(values[1] - values[3]) > 1e-3


def test_trainer_logs_the_epochs_teacher_temperature(images, tmp_path):
    """Through the trainer: every step of epoch e is computed (and logged) at schedule[e], for DINO and for
    SelfPatch (whose patch loss shares the temperature)."""
    for name in ("dino", "selfpatch"):
        _trainer(name, images, tmp_path / name).fit()
        temps = [(r["epoch"], r["teacher_temp"]) for r in _records(tmp_path / name)]
        assert temps == [(0, pytest.approx(0.04))] * 4 + [(1, pytest.approx(0.07))] * 4, name
