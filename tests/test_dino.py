"""DINO: loss against hand-computed values, centre, teacher EMA, frozen parameters."""

from __future__ import annotations

import math

import numpy as np
import torch

from densessl.methods import get_method
from densessl.methods.dino import DINOLoss

TINY = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=2,
            drop_path_rate=0.0)


def test_dino_loss_matches_hand_computation():
    torch.manual_seed(0)
    batch, dim, crops = 2, 5, 3
    student = torch.randn(crops * batch, dim)
    teacher = torch.randn(2 * batch, dim)
    loss_fn = DINOLoss(dim, crops, np.array([0.04]), student_temp=0.1, center_momentum=0.9)
    loss_fn.center.fill_(0.5)
    loss, _ = loss_fn(student, teacher, epoch=0)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    s, t = student.numpy(), teacher.numpy()
    total, pairs = 0.0, 0
    for iq in range(2):
        q = softmax((t[iq * batch:(iq + 1) * batch] - 0.5) / 0.04)
        for v in range(crops):
            if v == iq:
                continue
            logp = np.log(softmax(s[v * batch:(v + 1) * batch] / 0.1))
            total += float(np.mean(np.sum(-q * logp, -1)))
            pairs += 1
    assert pairs == 2 * crops - 2
    assert math.isclose(loss.item(), total / pairs, rel_tol=1e-5)
    # centre ← 0.9 c + 0.1 mean(teacher)
    expected_center = 0.9 * 0.5 + 0.1 * t.mean(0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], expected_center, rtol=1e-5)


def test_uniform_outputs_give_log_out_dim():
    loss_fn = DINOLoss(64, 4, np.array([0.04]), 0.1, 0.9)
    loss, logs = loss_fn(torch.zeros(8, 64), torch.zeros(4, 64), 0)
    assert math.isclose(loss.item(), math.log(64), rel_tol=1e-6)
    assert math.isclose(logs["teacher_entropy"], math.log(64), rel_tol=1e-4)


def _batch(size=32, local=16, n=4):
    torch.manual_seed(1)
    return {"crops": [torch.randn(n, 3, size, size) for _ in range(2)] + [torch.randn(n, 3, local, local)] * 2}


def test_gradients_reach_only_the_student_and_last_layer_frozen_in_epoch_zero():
    method = get_method("dino")("vit-tiny-p8", dict(TINY, norm_last_layer=True), epochs=2)
    loss, _ = method.loss(_batch(), epoch=0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student.backbone.patch_embed.proj.weight.grad is not None
    method.cancel_gradients(epoch=0)
    last = dict(method.student.named_parameters())
    assert last["head.last_layer.parametrizations.weight.original1"].grad is None
    assert not last["head.last_layer.parametrizations.weight.original0"].requires_grad  # norm_last_layer


def test_optimizer_step_changes_student_not_teacher_then_ema():
    method = get_method("dino")("vit-tiny-p8", TINY, epochs=2)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student_before = method.student.backbone.blocks[0].attn.qkv.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in method.student.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = method.loss(_batch(), epoch=1)
    loss.backward()
    opt.step()
    assert not torch.equal(student_before, method.student.backbone.blocks[0].attn.qkv.weight)
    for k, v in method.teacher.state_dict().items():
        if not k.endswith("running_mean") and not k.endswith("running_var") and "num_batches" not in k:
            assert torch.equal(v, teacher_before[k]), k
    m = 0.9
    method.update_teacher(m)
    expected = m * teacher_before["backbone.blocks.0.attn.qkv.weight"] + \
        (1 - m) * method.student.backbone.blocks[0].attn.qkv.weight.detach()
    torch.testing.assert_close(method.teacher.backbone.blocks[0].attn.qkv.weight, expected)


def test_views_record_boxes_and_flips(random_images):
    method = get_method("dino")("vit-tiny-p8", TINY, epochs=1)
    views = method.views()(random_images[0])
    assert [c.shape[-1] for c in views["crops"]] == [32, 32, 16, 16]
    boxes = views["boxes"]
    assert boxes.shape == (4, 4)
    assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    assert torch.all((boxes >= 0) & (boxes <= 1))
    assert views["flips"].dtype == torch.bool
