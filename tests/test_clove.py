"""CLoVE: positive geometry, ranking loss and LARS against hand-computed values; a training step on resnet-tiny."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

from densessl.data.views import ColorAugmentation, CropSpec, MultiCropViews
from densessl.errors import ConfigError
from densessl.methods import get_method
from densessl.methods.base import METHODS
from densessl.methods.clove import (
    CLoVE,
    CLoVELoss,
    _cell_centres,
    oriented_boxes,
    positive_mask,
    ranking_loss,
)
from densessl.models.resnet import create_resnet
from densessl.train.lars import LARS, lars_param_groups

TINY = dict(projector_hidden_dim=64, projector_out_dim=32, attn_heads=4, global_size=64, local_size=32,
            local_crops_number=2)


# ------------------------------------------------------------------------------------------------ geometry
def test_positive_mask_hand_computed():
    # query: whole image on a 2×2 map (bins 0.5, diagonal 0.7071); key: top-right quarter on a 2×2 map
    # (bins 0.25). Threshold 0.7 × 0.7071 = 0.495. Query centres (.25,.25) (.75,.25) (.25,.75) (.75,.75);
    # key centres (.625,.125) (.875,.125) (.625,.375) (.875,.375); distances 0.177 / 0.395 / 0.530 / 0.637.
    box_q = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    box_k = torch.tensor([[0.5, 0.0, 1.0, 0.5]])
    mask = positive_mask(box_q, box_k, (2, 2), (2, 2), 0.7)
    expected = torch.tensor([[[1, 0, 1, 0],
                              [1, 1, 1, 1],
                              [0, 0, 0, 0],
                              [0, 0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # flipped key: its column 0 now sits at x = 0.875, column 1 at 0.625 → the key columns swap
    flipped_k = oriented_boxes(box_k, torch.tensor([True]))
    assert flipped_k.tolist() == [[1.0, 0.0, 0.5, 0.5]]
    mask = positive_mask(box_q, flipped_k, (2, 2), (2, 2), 0.7)
    expected = torch.tensor([[[0, 1, 0, 1],
                              [1, 1, 1, 1],
                              [0, 0, 0, 0],
                              [0, 0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_positive_mask_flipped_query_is_a_mirror_permutation():
    # the same box, query flipped: each query cell matches only its mirror (distance 0); neighbours are
    # 0.5 apart > 0.7 × 0.7071 = 0.495
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    q = oriented_boxes(box, torch.tensor([True]))
    mask = positive_mask(q, box, (2, 2), (2, 2), 0.7)
    expected = torch.tensor([[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # with threshold 0.75 (> 0.5 / 0.7071 = 0.7071) the direct neighbours join, the diagonal (1.0) does not
    mask = positive_mask(q, box, (2, 2), (2, 2), 0.75)
    assert mask[0, 0].tolist() == [True, True, False, True]


@pytest.mark.parametrize("flip", [False, True])
def test_cell_centres_match_the_pixels_a_real_crop_holds(flip):
    # Encode each pixel's own coordinates in the image (R = x, G = y), crop with MultiCropViews, and check
    # that the mean coordinate inside each 4×4 cell of the crop is the cell centre the loss assumes.
    size = 200
    xs, ys = np.meshgrid(np.arange(size), np.arange(size))
    rgb = np.stack([(xs + 0.5) / size * 255, (ys + 0.5) / size * 255, np.zeros_like(xs)], -1)
    image = Image.fromarray(rgb.round().astype("uint8"))
    color = ColorAugmentation(jitter_prob=0.0, grayscale_prob=0.0, flip_prob=1.0 if flip else 0.0,
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    views = MultiCropViews([CropSpec(64, (0.2, 0.5), 1, blur_prob=0.0)], color)
    torch.manual_seed(3)
    random.seed(3)
    out = views(image)
    crop = out["crops"][0]
    assert bool(out["flips"][0]) is flip
    box = oriented_boxes(out["boxes"], out["flips"])
    cx, cy, _ = _cell_centres(box, 4, 4)
    cells = torch.nn.functional.avg_pool2d(crop[None, :2], 16)[0]  # (2, 4, 4) mean normalised coordinates
    torch.testing.assert_close(cells[0].flatten(), cx[0], atol=0.01, rtol=0)
    torch.testing.assert_close(cells[1].flatten(), cy[0], atol=0.01, rtol=0)


def test_crop_box_conventions_hand_worked():
    # a 40×30 crop at (left 10, top 5) of a 101×51 image
    from densessl.data.views import crop_box

    # PixPro/CLoVE RandomResizedCropCoord: (j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1))
    assert crop_box(10, 5, 40, 30, 101, 51, "pixel_index") == pytest.approx([0.1, 0.1, 0.49, 0.68])
    # pixel edges over the size: (10/101, 5/51, 50/101, 35/51)
    assert crop_box(10, 5, 40, 30, 101, 51, "edges") == pytest.approx([10 / 101, 5 / 51, 50 / 101, 35 / 51])
    with pytest.raises(ConfigError, match="box_convention"):
        crop_box(10, 5, 40, 30, 101, 51, "corners")


def test_clove_views_record_boxes_as_the_official_code(random_images):
    views = get_method("clove")("resnet-tiny", TINY, epochs=1).views()
    assert views.box_convention == "pixel_index"
    image = random_images[0]
    torch.manual_seed(0)
    random.seed(0)
    out = views(image)
    # replay the first crop's parameters with the same seeds: the box is the official one
    torch.manual_seed(0)
    top, left, h, w = T.RandomResizedCrop.get_params(image, scale=views.crops[0].scale, ratio=(3 / 4, 4 / 3))
    width, height = image.size
    expected = [left / (width - 1), top / (height - 1), (left + w - 1) / (width - 1), (top + h - 1) / (height - 1)]
    assert out["boxes"][0].tolist() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------ loss
def _unit_maps() -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)          # cells (1,0), (0,1)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]).T.reshape(1, 2, 1, 4)
    return q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1)


def test_ranking_loss_hand_computed():
    q, k = _unit_maps()
    # image 0: q0↔k0 and q1↔k1 positive; image 1: no positives
    pos = torch.zeros(2, 2, 4, dtype=torch.bool)
    pos[0, 0, 0] = pos[0, 1, 1] = True
    # logits −2cos: q0 → [−2, 0, −1.2, −1.6], q1 → [0, −2, −1.6, −1.2]
    # image 0: positives = −4 / (2 + 1e-6); non-positives of q0 {0, −1.2, −1.6}: 3 smallest, drop the
    #   smallest → mean(−1.2, 0) = −0.6, same for q1 → negatives −0.6; loss = 2·(−2) + 0.6 + 100 = 96.6
    # image 1: positives 0 (0 / 1e-6); 3 smallest of q0 {−2, −1.6, −1.2}, drop −2 → −1.4 (q1 too);
    #   loss = 0 + 1.4 + 100 = 101.4; batch mean 99.0
    loss, stats = ranking_loss(q, k, pos, gamma=2.0, margin=100.0, topk=3, skip=1)
    assert math.isclose(loss.item(), (2 * (-4 / (2 + 1e-6)) + 0.6 + 100 + 101.4) / 2, rel_tol=1e-6)
    assert math.isclose(loss.item(), 99.0, rel_tol=1e-5)
    assert math.isclose(stats["neg_logit"].item(), (-0.6 - 1.4) / 2, rel_tol=1e-6)
    # margin 1: image 0 → max(0, −4 + 0.6 + 1) = 0, image 1 → 2.4; mean 1.2
    loss, _ = ranking_loss(q, k, pos, gamma=2.0, margin=1.0, topk=3, skip=1)
    assert math.isclose(loss.item(), 1.2, rel_tol=1e-5)
    with pytest.raises(ConfigError, match="negatives_topk"):
        ranking_loss(q, k, pos, 2.0, 100.0, topk=10, skip=1)


def test_collapsed_embeddings_give_98():
    # every cell the same unit vector: all logits −2 → γ·(−2) − (−2) + 100 = 98 (the collapse signature)
    q = torch.nn.functional.normalize(torch.ones(2, 4, 3, 3), dim=1)
    k = torch.nn.functional.normalize(torch.ones(2, 4, 4, 4), dim=1)
    pos = positive_mask(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2),
                        (3, 3), (4, 4), 0.7)
    loss, _ = ranking_loss(q, k, pos, gamma=2.0, margin=100.0, topk=10, skip=1)
    assert math.isclose(loss.item(), 98.0, rel_tol=1e-6)


def test_loss_pairs_every_student_view_with_the_other_teacher_globals():
    torch.manual_seed(0)
    n = 2

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape), dim=1)

    sg, tg, sl = [unit(n, 8, 4, 4) for _ in range(2)], [unit(n, 8, 4, 4) for _ in range(2)], [unit(n, 8, 2, 2)]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 0.9, 0.8], [0.2, 0.2, 0.6, 0.6]]).repeat(n, 1, 1)
    crit = CLoVELoss(0.7, 2.0, 100.0, topk=4, skip=1)
    loss, logs = crit(sg, sl, tg, boxes)

    def term(query, view, j):
        mask = positive_mask(boxes[:, view], boxes[:, j], tuple(query.shape[-2:]), (4, 4), 0.7)
        return ranking_loss(query, tg[j], mask, 2.0, 100.0, 4, 1)[0]

    expected = (term(sg[1], 1, 0) + term(sl[0], 2, 0) + term(sg[0], 0, 1) + term(sl[0], 2, 1)) / 4
    torch.testing.assert_close(loss, expected)
    assert logs["pair_terms"] == 4.0


# ------------------------------------------------------------------------------------------------ LARS
def test_lars_two_steps_hand_computed():
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    # trainer-style groups: decayed matrices first, 1-D params with wd 0 (excluded from LARS by ndim)
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=2.0, momentum=0.9)
    grad_w, grad_b = torch.tensor([[0.3, 0.0], [0.0, 0.4]]), torch.tensor([0.5, 0.5])

    def step():
        w.grad, b.grad = grad_w.clone(), grad_b.clone()
        opt.step()

    # step 1: g = ∇ + 0.1·W = diag(0.6, 0.8), ‖g‖ = 1, ‖W‖ = 5 → ratio 1e-3·5/(1 + 1e-8);
    # buffer = g·ratio = diag(0.003, 0.004); W ← W − 2·buffer = diag(2.994, 3.992). Bias: plain SGD, b − 2·0.5.
    step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.994, 0.0], [0.0, 3.992]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, -2.0]))
    # step 2: W = 0.998·diag(3, 4), g = ∇ + 0.1·W = 0.999·diag(0.6, 0.8); ‖W‖ = 4.99, ‖g‖ = 0.999
    # → scaled g = 1e-3·4.99·diag(0.6, 0.8) = diag(0.002994, 0.003992); buffer = 0.9·old + new
    # = diag(0.005694, 0.007592); W = diag(2.994 − 0.011388, 3.992 − 0.015184).
    # Bias: buffer 0.9·0.5 + 0.5 = 0.95 → b = (0 − 1.9, −2 − 1.9).
    step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.982612, 0.0], [0.0, 3.976816]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.tensor([-1.9, -3.9]))
    # the state round-trips like any torch optimiser's (the trainer checkpoints it)
    state = opt.state_dict()
    assert torch.allclose(state["state"][0]["momentum_buffer"], torch.tensor([[0.005694, 0.0], [0.0, 0.007592]]))


def test_lars_zero_norm_and_forced_flags():
    p = torch.nn.Parameter(torch.zeros(2, 2))          # ‖θ‖ = 0 → ratio 1 (contrast/lars.py)
    v = torch.nn.Parameter(torch.tensor([3.0, 4.0]))   # 1-D but forced into LARS scaling
    opt = LARS([{"params": [p]}, {"params": [v], "lars_exclude": False}], lr=1.0, momentum=0.0)
    p.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    v.grad = torch.tensor([0.0, 2.0])                  # ratio = 1e-3·5/2 → step (0, 0.005)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(v.detach(), torch.tensor([3.0, 4.0 - 0.005]), rtol=0, atol=1e-7)


def test_lars_param_groups_split_like_add_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = lars_param_groups(model, 2e-5)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3)]
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (4,), (4,)]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (2e-5, 0.0)
    assert (decay["lars_exclude"], no_decay["lars_exclude"]) == (False, True)


# ------------------------------------------------------------------------------------------------ method
def _batch(n: int = 2, locals_: int = 2) -> dict:
    torch.manual_seed(1)
    crops = [torch.randn(n, 3, 64, 64) for _ in range(2)] + [torch.randn(n, 3, 32, 32) for _ in range(locals_)]
    boxes = torch.tensor([[0.0, 0.0, 0.9, 1.0], [0.1, 0.05, 1.0, 0.85]] + [[0.2, 0.3, 0.5, 0.6]] * locals_)
    flips = torch.tensor([False, True] + [False] * locals_)
    return {"crops": crops, "boxes": boxes.repeat(n, 1, 1), "flips": flips.repeat(n, 1)}


def test_registered_with_lars_and_checkpoint_compatible_names():
    assert METHODS["clove"] is CLoVE and CLoVE.optimizer_name == "lars"
    method = get_method("clove")("resnet-tiny", TINY, epochs=1)
    keys = set(method.student.state_dict())
    assert {"self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
            "projector.linear1.weight", "projector.bn1.running_mean", "projector.linear2.weight",
            "projector.bn2.running_var", "encoder.conv1.weight"} <= keys
    assert "projector.bn2.weight" not in keys  # bn2 is affine=False
    assert method.student.self_attn.in_proj_weight.shape == (3 * 32, 32)
    # teacher = copies of encoder + projector, no attention, no gradients
    assert set(method.teacher.state_dict()) == {k for k in keys if not k.startswith("self_attn.")}
    assert not any(p.requires_grad for p in method.teacher.parameters())
    # zero-init residual (contrast/resnet.py) and the frozen, unused classifier
    assert torch.count_nonzero(method.student.encoder.layer1[0].bn2.weight) == 0
    assert not method.student.encoder.fc.weight.requires_grad


def test_full_loss_and_backward_on_resnet_tiny():
    method = get_method("clove")("resnet-tiny", TINY, epochs=1)
    loss, logs = method.loss(_batch(), epoch=0)
    # logits lie in [−2, 2]: γ·pos − neg + 100 ∈ [94, 106] and the hinge is always active
    assert 94.0 <= loss.item() <= 106.0
    assert logs["pair_terms"] == 2 * (1 + 2)
    assert -1.0 <= logs["pos_cos"] <= 1.0 and logs["pos_per_query"] > 0
    loss.backward()
    s = method.student
    # zero-init residual: the residual branches' last BN γ is 0, so γ gets a gradient and the convs before it
    # do not yet; the stem reaches the loss through the identity paths
    assert s.encoder.layer4[0].conv1.weight.grad.abs().sum() == 0
    for p in (s.encoder.conv1.weight, s.encoder.layer4[0].bn2.weight, s.projector.linear1.weight,
              s.self_attn.in_proj_weight, s.self_attn.out_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert s.encoder.fc.weight.grad is None
    assert all(p.grad is None for p in method.teacher.parameters())


def test_lars_step_changes_student_not_teacher_then_ema():
    method = get_method("clove")("resnet-tiny", TINY, epochs=1)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    w_before = method.student.encoder.conv1.weight.detach().clone()
    attn_before = method.student.self_attn.in_proj_weight.detach().clone()
    opt = LARS(lars_param_groups(method.student, 2e-5), lr=1.0, momentum=0.9)
    loss, _ = method.loss(_batch(), epoch=0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(w_before, method.student.encoder.conv1.weight)
    assert not torch.equal(attn_before, method.student.self_attn.in_proj_weight)
    for k, v in method.teacher.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BN stats move in forward
            assert torch.equal(v, teacher_before[k]), k
    m = 0.99
    method.update_teacher(m)
    expected = m * teacher_before["encoder.conv1.weight"] + \
        (1 - m) * method.student.encoder.conv1.weight.detach()
    torch.testing.assert_close(method.teacher.encoder.conv1.weight, expected)
    expected = m * teacher_before["projector.linear2.weight"] + \
        (1 - m) * method.student.projector.linear2.weight.detach()
    torch.testing.assert_close(method.teacher.projector.linear2.weight, expected)


def test_views_collate_into_a_batch_the_loss_accepts(random_images):
    method = get_method("clove")("resnet-tiny", TINY, epochs=1)
    views = method.views()
    samples = [views(img) for img in random_images[:2]]
    assert [c.shape[-1] for c in samples[0]["crops"]] == [64, 64, 32, 32]
    batch = default_collate(samples)
    assert batch["boxes"].shape == (2, 4, 4) and batch["flips"].shape == (2, 4)
    loss, _ = method.loss(batch, epoch=0)
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="local_crops_number"):
        method.loss({**batch, "crops": batch["crops"][:3]}, epoch=0)


def test_export_backbone_is_the_online_encoder_with_torchvision_keys():
    method = get_method("clove")("resnet-tiny", TINY, epochs=1)
    with torch.no_grad():
        method.student.encoder.conv1.weight.add_(1.0)  # make student and teacher differ
    exported = method.export_backbone()
    fresh = create_resnet("resnet-tiny")
    assert list(exported.state_dict()) == list(fresh.state_dict())
    torch.testing.assert_close(exported.conv1.weight, method.student.encoder.conv1.weight)
    fresh.load_state_dict(exported.state_dict())  # strict: the exported module rebuilds from (arch, {})
    teacher = get_method("clove")("resnet-tiny", dict(TINY, export_weights="teacher"), epochs=1)
    torch.testing.assert_close(teacher.export_backbone().conv1.weight, teacher.teacher.encoder.conv1.weight)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="attn_heads"):
        get_method("clove")("resnet-tiny", dict(TINY, attn_heads=5), epochs=1)
    with pytest.raises(ConfigError, match="export_weights"):
        get_method("clove")("resnet-tiny", dict(TINY, export_weights="ema"), epochs=1)
    with pytest.raises(ConfigError, match="unknown field"):
        get_method("clove")("resnet-tiny", dict(TINY, lamb=2), epochs=1)


def test_channels_last_training_matches_the_default_layout(tmp_path):
    """train.channels_last changes the memory layout only: the same losses, conv weights stored NHWC."""
    import json

    import numpy as np
    from PIL import Image

    from densessl.train.trainer import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(8)]

    def losses(channels_last: bool) -> tuple[list[float], Trainer]:
        torch.manual_seed(0)
        method = get_method("clove")("resnet-tiny", TINY, epochs=1)
        cfg = TrainConfig(epochs=1, batch_size_per_gpu=4, lr=0.1, warmup_epochs=0, num_workers=0, tensorboard=False,
                          log_every_steps=1, precision="fp32", channels_last=channels_last)
        out = tmp_path / str(channels_last)
        trainer = Trainer(method, images, cfg, out, device="cpu")
        trainer.fit()
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()], trainer

    default, _ = losses(False)
    nhwc, trainer = losses(True)
    assert len(default) == 2
    np.testing.assert_allclose(nhwc, default, rtol=1e-4, atol=1e-5)
    conv = trainer.method.student.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
