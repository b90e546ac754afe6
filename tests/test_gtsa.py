"""GTSA: view geometry, RoI alignment under rotation/flip, losses against hand-computed values, EMA, export."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

from densessl.errors import ConfigError, DataError
from densessl.methods import get_method
from densessl.methods.gtsa import (
    GTSA,
    ConvHead,
    PairGeometry,
    crop_and_pc_losses,
    matched_negative_cosine,
    negative_cosine_map,
    roi_pool,
    rotate_maps,
    rotation_loss,
    teacher_to_student_frame,
)
from densessl.methods.gtsa_views import GTSAViews, pair_boxes, quarter_turns, render_crop, to_crop_frame
from densessl.train.trainer import TrainConfig, Trainer

TINY = dict(global_size=32, local_size=16, local_crops_number=2, projector_dim=16, out_dim=16, predictor_dim=16,
            rot_hidden_dim=16, rot_bottleneck_dim=8, roi_out_size=(3, 2), num_matches=(8, 2), drop_path_rate=0.0)


def _method(**overrides) -> GTSA:
    return get_method("gtsa")("vit-tiny-p8", dict(TINY, **overrides), epochs=20)


# ------------------------------------------------------------------------------------------------ view geometry
def test_to_crop_frame_hand_values():
    crop = torch.tensor([0.25, 0.25, 0.75, 0.75])
    region = torch.tensor([0.25, 0.5, 0.375, 0.75])  # → (0, 4, 2, 8) in an 8-px crop
    expected = {  # (flip, quarter turns): box; CCW turn maps (x, y) → (y, 8 − x)
        (False, 0): [0, 4, 2, 8],
        (False, 1): [4, 6, 8, 8],
        (False, 2): [6, 0, 8, 4],
        (False, 3): [0, 0, 4, 2],
        (True, 0): [6, 4, 8, 8],
        (True, 1): [4, 0, 8, 2],
    }
    for (flip, turns), box in expected.items():
        got = to_crop_frame(region, crop, 8.0, torch.tensor(flip), torch.tensor(turns))
        assert got.tolist() == box, (flip, turns)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("angle", [0, 90, 180, 270])
def test_rendered_crop_agrees_with_box_geometry(flip, angle):
    """A bright rectangle lands where to_crop_frame says, for PIL's real crop/flip/rotation."""
    image = np.zeros((32, 32), dtype=np.uint8)
    image[6:16, 10:14] = 255                       # x ∈ [10, 14), y ∈ [6, 16)
    crop = render_crop(Image.fromarray(image), (8, 4, 24, 20), 16, flip, angle)  # 16 px box → 16 px: no resampling
    ys, xs = np.nonzero(np.asarray(crop) > 127)
    found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    predicted = to_crop_frame(torch.tensor([10, 6, 14, 16]) / 32.0, torch.tensor([8, 4, 24, 20]) / 32.0, 16.0,
                              torch.tensor(flip), quarter_turns(torch.tensor(angle)))
    assert predicted.tolist() == pytest.approx(found)


def test_views_record_what_they_render(random_images):
    views = GTSAViews(global_size=16, local_size=8, global_count=2, local_count=3, flip_prob=0.5, jitter_prob=0.0,
                      grayscale_prob=0.0, blur_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = random_images[0]
    torch.manual_seed(0)
    random.seed(3)
    out = views(image)
    assert [c.shape[-1] for c in out["crops"]] == [16, 16, 8, 8, 8]
    assert out["boxes"].shape == (5, 4) and out["flips"].dtype == torch.bool and out["angles"].dtype == torch.long
    assert set(out["angles"].tolist()) <= {0, 90, 180, 270}
    w, h = image.size
    pixel_boxes = [(round(b[0] * w), round(b[1] * h), round(b[2] * w), round(b[3] * h)) for b in out["boxes"].tolist()]
    for crop, box, flip, angle, size in zip(out["crops"], pixel_boxes, out["flips"], out["angles"], views.sizes):
        expected = render_crop(image, box, size, bool(flip), int(angle))
        expected_t = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(crop, expected_t)
    # every crop overlaps every global crop by more than 1 % (2 % between globals) of the image area
    area = lambda a, b: max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)  # noqa: E731
    threshold = int(w * h * 0.01)
    assert area(pixel_boxes[1], pixel_boxes[0]) > 2 * threshold
    for box in pixel_boxes[2:]:
        assert all(area(box, g) > threshold for g in pixel_boxes[:2])


def test_overlap_resampling_thresholds(monkeypatch):
    """Scripted crops on a 40×40 image: threshold int(1600·0.01) = 16 px², doubled between global crops, strict '>'."""
    script = iter([(0, 0, 10, 10),                      # global 0 → box (0, 0, 10, 10)
                   (30, 30, 10, 10), (5, 5, 10, 10),    # global 1: overlaps 0 and 25 px² ≤ 32 → re-sampled
                   (2, 2, 10, 10),                      # 64 px² > 32 → kept
                   (6, 6, 4, 4), (0, 0, 5, 5),          # local: 16 ≤ 16 with both; 25 with g0 but 9 with g1
                   (3, 3, 6, 6)])                       # 36 and 36 > 16 → kept
    calls = []

    def scripted(image, scale, ratio):
        calls.append(scale)
        return next(script)

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(scripted))
    views = GTSAViews(global_count=2, local_count=1)
    assert views.sample_boxes(40, 40) == [(0, 0, 10, 10), (2, 2, 12, 12), (3, 3, 9, 9)]
    assert len(calls) == 7 and calls[0] == [0.3, 1.0] and calls[-1] == [0.1, 0.3]


def test_views_fixed_rotation_and_flip(random_images):
    out = GTSAViews(global_size=16, local_size=8, local_count=2, angles=(270,), flip_prob=1.0)(random_images[1])
    assert out["angles"].tolist() == [270] * 4 and out["flips"].all()


def test_impossible_overlap_fails_with_the_fields_to_change(random_images):
    views = GTSAViews(global_size=8, local_size=8, local_count=1, global_scale=(0.01, 0.01),
                      min_intersection=0.5, max_attempts=5)
    with pytest.raises(DataError, match="min_intersection"):
        views(random_images[0])


def test_pair_boxes_hand_values():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]])
    in_global, in_view = pair_boxes(boxes, torch.tensor([[False, False]]), torch.tensor([[0, 90]]), [8, 4], 1)
    assert in_global.shape == (1, 1, 2, 4)
    assert in_global[0, 0, 0].tolist() == [0, 0, 8, 8]          # a crop with itself: the whole crop
    assert in_global[0, 0, 1].tolist() == [4, 4, 8, 8]          # overlap (.25,.25,.5,.5) in the 8-px global crop
    assert in_view[0, 0, 1].tolist() == [0, 2, 2, 4]            # (0, 0, 2, 2) in the 4-px crop, turned CCW


def test_rotation_labels():
    assert quarter_turns(torch.tensor([0, 90, 180, 270])).tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="45"):
        quarter_turns(torch.tensor([0, 45]))


# ------------------------------------------------------------------------------------------------ alignment
def test_roi_pool_on_coordinate_ramp():
    ramp = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="xy")).unsqueeze(0)  # (x, y)
    # box (4, 12, 20, 28) px with patch 8 = cells (0.5, 1.5, 2.5, 3.5); aligned samples at bin centres − 0.5
    out = roi_pool(ramp, torch.tensor([[4.0, 12.0, 20.0, 28.0]]), output_size=2, patch_size=8)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.5, 1.5], [0.5, 1.5]]))
    torch.testing.assert_close(out[0, 1], torch.tensor([[1.5, 1.5], [2.5, 2.5]]))


def test_rotate_and_frame_change_hand_values():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    turned = rotate_maps(m, torch.tensor([0, 1, 3]))
    assert turned[0, 0].tolist() == [[1, 2], [3, 4]]
    assert turned[1, 0].tolist() == [[2, 4], [1, 3]]            # counter-clockwise: top-right → top-left
    assert turned[2, 0].tolist() == [[3, 1], [4, 2]]            # clockwise
    f = torch.tensor([False])
    # teacher turned once CCW, student not: undo = one clockwise turn
    assert teacher_to_student_frame(m[:1], torch.tensor([1]), f, torch.tensor([0]), f)[0, 0].tolist() == \
        [[3, 1], [4, 2]]
    # teacher flipped, student not: mirror
    assert teacher_to_student_frame(m[:1], torch.tensor([0]), torch.tensor([True]), torch.tensor([0]), f)[0, 0] \
        .tolist() == [[2, 1], [4, 3]]


def _source_coordinate_map(box, size, patch, flip, turns):
    """The 'feature' of a crop = source (x, y) of every cell centre, then flipped/rotated like the image."""
    cells = size // patch
    centres = (torch.arange(cells, dtype=torch.float64) + 0.5) / cells
    x = box[0] + centres * (box[2] - box[0])
    y = box[1] + centres * (box[3] - box[1])
    m = torch.stack(torch.meshgrid(x, y, indexing="xy")).float().unsqueeze(0)
    if flip:
        m = m.flip(-1)
    return torch.rot90(m, turns, dims=(-2, -1))


@pytest.mark.parametrize("teacher", [(False, 0), (False, 1), (True, 3), (False, 2)])
@pytest.mark.parametrize("student", [(False, 0), (False, 3), (True, 1), (True, 2)])
def test_aligned_teacher_equals_student_and_hand_values(teacher, student):
    """Equivariant features: after alignment both views give the source coordinates of the same grid."""
    (t_flip, t_turns), (s_flip, s_turns) = teacher, student
    t_box, s_box = [0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]   # overlap (.25, .25, .5, .5)
    t_map = _source_coordinate_map(t_box, 64, 8, t_flip, t_turns)   # 8×8 cells of 1/16
    s_map = _source_coordinate_map(s_box, 32, 8, s_flip, s_turns)   # 4×4 cells of 1/8
    flips = torch.tensor([[t_flip, s_flip]])
    angles = torch.tensor([[90 * t_turns, 90 * s_turns]])
    in_global, in_view = pair_boxes(torch.tensor([[t_box, s_box]]), flips, angles, [64, 32], 1)
    pooled_t = roi_pool(t_map, in_global[:, 0, 1], 2, 8)
    pooled_s = roi_pool(s_map, in_view[:, 0, 1], 2, 8)
    aligned_t = teacher_to_student_frame(pooled_t, torch.tensor([t_turns]), flips[:, 0], torch.tensor([s_turns]),
                                         flips[:, 1])
    # hand-computed: bins of 1/8 over (.25, .5) → centres .3125, .4375, laid out in the student's frame
    canonical = torch.tensor([[[0.3125, 0.4375], [0.3125, 0.4375]], [[0.3125, 0.3125], [0.4375, 0.4375]]])
    expected = torch.rot90(canonical.flip(-1) if s_flip else canonical, s_turns, dims=(-2, -1)).unsqueeze(0)
    torch.testing.assert_close(pooled_s, expected)
    torch.testing.assert_close(aligned_t, expected)
    geom = PairGeometry(in_global, in_view, quarter_turns(angles), flips)
    crop, _ = crop_and_pc_losses([t_map, s_map], [t_map], geom, 1, (2, 2), (2, 2), 8)
    assert crop.item() == pytest.approx(-1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ losses
def _np_cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _np_matched(inputs, candidates, k):
    sims = np.array([[_np_cos(i, c) for c in candidates] for i in inputs])
    best = sims.max(1)
    keep = np.argsort(-best)[:k]
    return -float(np.mean([best[i] for i in keep]))


def test_matched_negative_cosine_hand_values():
    s = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = np.array([[1.0, 0.1], [-1.0, 0.0], [0.5, 3.0], [0.0, -1.0]])
    # student → teacher: best cos per student token, keep the 2 largest
    got = matched_negative_cosine(torch.tensor(s).float()[None], torch.tensor(t).float()[None], 2)
    best = [_np_cos(s[0], t[0]), _np_cos(s[1], t[2]), _np_cos(s[2], t[2])]
    assert got.item() == pytest.approx(-np.mean(sorted(best)[-2:]), rel=1e-5)
    assert got.item() == pytest.approx(_np_matched(s, t, 2), rel=1e-5)
    back = matched_negative_cosine(torch.tensor(t).float()[None], torch.tensor(s).float()[None], 3)
    assert back.item() == pytest.approx(_np_matched(t, s, 3), rel=1e-5)


def test_crop_and_pc_losses_hand_values():
    """Two 16-px global views (2×2 maps), full-crop overlap, view 1 turned 90°: RoI = identity pooling."""
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(1, 3, 2, 2, generator=g) for _ in range(2)]
    teacher = [torch.randn(1, 3, 2, 2, generator=g) for _ in range(2)]
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    flips = torch.zeros(1, 2, dtype=torch.bool)
    angles = torch.tensor([[0, 90]])
    in_global, in_view = pair_boxes(boxes, flips, angles, [16, 16], 2)
    geom = PairGeometry(in_global, in_view, quarter_turns(angles), flips)
    crop, pc = crop_and_pc_losses(student, teacher, geom, 2, (2, 2), (3, 3), 8)

    s = [x[0].numpy() for x in student]
    t = [x[0].numpy() for x in teacher]
    # pair (teacher 0 → student 1): teacher turned +90° CCW; pair (teacher 1 → student 0): turned back (−90°)
    t0_in_1 = np.rot90(t[0], 1, axes=(1, 2))
    t1_in_0 = np.rot90(t[1], -1, axes=(1, 2))
    neg_cos = lambda a, b: -np.mean(_np_cos(a.reshape(3, -1).T, b.reshape(3, -1).T))  # noqa: E731
    assert crop.item() == pytest.approx(0.5 * (neg_cos(s[1], t0_in_1) + neg_cos(s[0], t1_in_0)), abs=1e-6)
    tok = lambda m: m.reshape(3, -1).T  # noqa: E731
    pc_pair = lambda a, b: 0.5 * (_np_matched(tok(a), tok(b), 3) + _np_matched(tok(b), tok(a), 3))  # noqa: E731
    assert pc.item() == pytest.approx(0.5 * (pc_pair(s[1], t[0]) + pc_pair(s[0], t[1])), abs=1e-6)
    neg = negative_cosine_map(torch.tensor([[[[3.0]], [[4.0]]]]), torch.tensor([[[[4.0]], [[3.0]]]]))
    assert neg.item() == pytest.approx(-24 / 25)


def test_rotation_loss_hand_values():
    logits = [torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]), torch.zeros(2, 4)]
    turns = torch.tensor([[0, 1], [2, 3]])
    loss, acc = rotation_loss(logits, turns)
    ce_view0 = 0.5 * ((math.log(math.exp(2) + 3) - 2) + (math.log(math.e + 3) - 1))
    assert loss.item() == pytest.approx(0.5 * (ce_view0 + math.log(4)), rel=1e-6)
    assert acc == pytest.approx(0.5 * (1.0 + 0.0))  # view 1's argmax (class 0) hits neither label


def test_projector_residual_and_predictor_without():
    x = torch.randn(2, 4, 3, 3)
    for residual in (True, False):
        head = ConvHead(4, 4, 5, layers=2, residual=residual)
        for block in head.blocks:
            torch.nn.init.zeros_(block[0].weight)  # block output = GELU(LayerNorm(0)) = 0
        expected = head.proj(x if residual else torch.zeros_like(x))
        torch.testing.assert_close(head(x), expected)


# ------------------------------------------------------------------------------------------------ method
def _batch(method: GTSA, images, n: int = 2) -> dict:
    torch.manual_seed(0)
    views = method.views()
    return default_collate([views(img) for img in images[:n]])


def test_total_loss_combines_terms_and_pc_warmup(random_images):
    method = _method()
    batch = _batch(method, random_images)
    for epoch, coef in ((10, 0.0), (11, 0.5)):
        torch.manual_seed(1)
        loss, logs = method.loss(batch, epoch)
        assert logs["pc_coef"] == coef
        assert loss.item() == pytest.approx(float(logs["crop_loss"] + coef * logs["pc_loss"] + 0.5 * logs["rot_loss"]),
                                            rel=1e-5)


def test_full_loss_backward_vit_tiny_batch2(random_images):
    method = get_method("gtsa")("vit-tiny-p8", dict(TINY, global_size=64, local_size=32, num_matches=(32, 8),
                                                   roi_out_size=(6, 3)), epochs=20)
    batch = _batch(method, random_images)
    assert batch["crops"][0].shape == (2, 3, 64, 64) and batch["boxes"].shape == (2, 4, 4)
    loss, logs = method.loss(batch, epoch=11)
    assert torch.isfinite(loss)
    assert -1.0 <= logs["crop_loss"] <= 1.0 and -1.0 <= logs["pc_loss"] <= 1.0
    loss.backward()
    no_grad = [n for n, p in method.student.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(p.grad is None for p in method.teacher.parameters())


def test_optimizer_step_changes_student_not_teacher_then_ema(random_images):
    method = _method()
    batch = _batch(method, random_images)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in method.student.state_dict().items()}
    opt = torch.optim.AdamW(method.student.parameters(), lr=1e-2)
    loss, _ = method.loss(batch, epoch=11)
    loss.backward()
    opt.step()
    for name in ("backbone.blocks.0.attn.qkv.weight", "projector.proj.weight", "predictor.proj.weight",
                 "rot_head.0.weight"):
        assert not torch.equal(student_before[name], method.student.state_dict()[name]), name
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not any(k.startswith(("predictor", "rot_head")) for k in method.teacher.state_dict())
    m = 0.9
    method.update_teacher(m)
    for name in ("backbone.blocks.0.attn.qkv.weight", "projector.blocks.0.0.weight"):
        expected = m * teacher_before[name] + (1 - m) * method.student.state_dict()[name]
        torch.testing.assert_close(method.teacher.state_dict()[name], expected)


def test_export_backbone_and_config_errors(random_images):
    method = _method()
    with torch.no_grad():
        method.teacher.backbone.blocks[0].attn.qkv.weight.add_(1.0)
    student_w = method.student.backbone.blocks[0].attn.qkv.weight
    exported = method.export_backbone()
    assert torch.equal(exported.blocks[0].attn.qkv.weight, student_w)
    assert exported is not method.student.backbone
    method.cfg.export_weights = "teacher"
    teacher_w = method.teacher.backbone.blocks[0].attn.qkv.weight
    assert torch.equal(method.export_backbone().blocks[0].attn.qkv.weight, teacher_w)
    with pytest.raises(ConfigError, match="export_weights"):
        _method(export_weights="momentum")
    with pytest.raises(ConfigError, match="unknown field"):
        _method(roi_size=3)
    with pytest.raises(ConfigError, match="num_matches"):
        _method(num_matches=(99, 2)).loss(_batch(_method(), random_images), epoch=11)



def test_two_trainer_steps_through_the_shared_loop(tmp_path, random_images):
    method = _method(local_crops_number=1)
    train = TrainConfig(epochs=1, batch_size_per_gpu=2, lr=1e-3, warmup_epochs=0, num_workers=0,
                        checkpoint_every_steps=100, log_every_steps=1)
    summary = Trainer(method, random_images[:4], train, tmp_path, device="cpu").fit(max_steps=2)
    assert summary["stopped_at_step"] == 2 and math.isfinite(summary["last_loss"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"crop_loss"' in lines[0] and '"rot_acc"' in lines[0]
