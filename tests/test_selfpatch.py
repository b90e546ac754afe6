"""SelfPatch: neighbour selection, aggregation, loss against hand-computed values, training-step behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from densessl.checkpoints.io import load_backbone, save_backbone
from densessl.errors import ConfigError
from densessl.methods import get_method
from densessl.methods.selfpatch import (
    SelfPatchAggregation,
    SelfPatchConfig,
    SelfPatchLoss,
    neighbour_candidates,
    select_neighbours,
)
from densessl.models.backbones import patch_tokens

TINY = dict(out_dim=16, out_dim_selfpatch=8, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=24,
            local_crops_number=2, drop_path_rate=0.0)


def _method(**overrides):
    import densessl.methods.selfpatch  # noqa: F401  (registers "selfpatch" until methods/__init__ imports it)

    return get_method("selfpatch")("vit-tiny-p8", dict(TINY, **overrides), epochs=2)


# ----------------------------------------------------------------------------------------- neighbours
def test_neighbour_candidates_wrap_around_the_border():
    table = neighbour_candidates(4, 4)
    assert table.shape == (16, 8)
    # 4×4 grid, row-major. Patch 0 = (0,0): rows {3,0,1} × cols {3,0,1} without (0,0)
    assert table[0].tolist() == [1, 3, 4, 5, 7, 12, 13, 15]
    assert table[3].tolist() == [0, 2, 4, 6, 7, 12, 14, 15]    # (0,3): cols wrap to 0
    assert table[5].tolist() == [0, 1, 2, 4, 6, 8, 9, 10]      # interior (1,1): the plain 3×3 window
    assert table[15].tolist() == [0, 2, 3, 8, 10, 11, 12, 14]  # (3,3): both wrap
    # rectangular 3×4 grid, patch (0,0): rows {2,0,1} × cols {3,0,1}
    assert neighbour_candidates(3, 4)[0].tolist() == [1, 3, 4, 5, 7, 8, 9, 11]
    # in a 3×3 grid every other patch is a neighbour
    small = neighbour_candidates(3, 3)
    for i in range(9):
        assert small[i].tolist() == [j for j in range(9) if j != i]
    with pytest.raises(ConfigError, match="smaller than the 3×3 neighbourhood"):
        neighbour_candidates(2, 4)


# angle of each patch of a 4×4 grid; cosine similarity of two patches = cos(angle difference)
ANGLES = [0.0, 1.5, 2.9, 0.3, 1.6, 0.4, 2.5, 1.7, 2.8, 2.0, 1.0, 2.7, 0.25, 1.8, 2.6, 0.1]
# top-4 by hand: patch 0 (a=0) among [1,3,4,5,7,12,13,15] → 15 (.1), 12 (.25), 3 (.3), 5 (.4)
#                patch 10 (a=1) among [5,6,7,9,11,13,14,15] → 5 (.6), 7 (.7), 13 (.8), 15 (.9)
#                patch 15 (a=.1) among [0,2,3,8,10,11,12,14] → 0 (.1), 12 (.15), 3 (.2), 10 (.9)
EXPECTED_TOP4 = {0: [15, 12, 3, 5], 10: [5, 7, 13, 15], 15: [0, 12, 3, 10]}


def _angle_tokens(dim: int = 16, batch: int = 2) -> torch.Tensor:
    """Features with known cosine similarities: 2-D unit vectors at ANGLES, rotated into ``dim`` dimensions by a
    random orthogonal map and scaled by positive factors (large on dissimilar candidates, so that a dot product
    instead of the cosine would pick them)."""
    gen = torch.Generator().manual_seed(0)
    angles = torch.tensor(ANGLES)
    plane = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (16, 2)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0][:2]  # (2, dim) orthonormal rows
    tokens = []
    for _ in range(batch):
        scale = 0.5 + 1.5 * torch.rand(16, 1, generator=gen)
        scale[1], scale[9], scale[6] = 100.0, 50.0, 80.0
        tokens.append(scale * plane @ basis)
    return torch.stack(tokens)


def test_select_neighbours_picks_top_k_by_cosine_including_border_patches():
    tokens = _angle_tokens()
    chosen, features = select_neighbours(tokens, (4, 4), k=4)
    assert chosen.shape == (2, 16, 4) and features.shape == (2, 16, 4, 16)
    for b in range(2):
        for patch, expected in EXPECTED_TOP4.items():
            assert chosen[b, patch].tolist() == expected
        torch.testing.assert_close(features[b], tokens[b][chosen[b]])
    # every choice is one of the 8 candidates and never the patch itself
    table = neighbour_candidates(4, 4)
    for i in range(16):
        assert set(chosen[0, i].tolist()) <= set(table[i].tolist())
        assert i not in chosen[0, i].tolist()


# ----------------------------------------------------------------------------------------- aggregation
def _aggregation() -> SelfPatchAggregation:
    torch.manual_seed(0)
    return SelfPatchAggregation(dim=16, num_heads=2, k_num=4)


def test_aggregation_shapes_and_student_passthrough():
    agg = _aggregation()
    tokens = _angle_tokens()
    teacher = agg(tokens, (4, 4), loc=True)
    student = agg(tokens, (4, 4), loc=False)
    assert teacher.shape == student.shape == (2, 17, 16)
    # student patches: only the final LayerNorm; the image token is the same in both modes
    torch.testing.assert_close(student[:, 1:], agg.norm(tokens))
    torch.testing.assert_close(student[:, 0], teacher[:, 0])
    assert len(agg.cls_blocks) == 2


def test_aggregated_token_is_class_attention_over_the_selected_neighbours():
    agg = _aggregation()
    tokens = _angle_tokens()
    out = agg(tokens, (4, 4), loc=True)
    for patch, idx in EXPECTED_TOP4.items():
        query = agg.cls_token.expand(2, -1, -1)
        for block in agg.cls_blocks:
            query = block(tokens[:, idx], query)
        torch.testing.assert_close(out[:, 1 + patch], agg.norm(query[:, 0]))


def test_aggregation_ignores_non_neighbours_and_the_patch_itself():
    agg = _aggregation()
    tokens = _angle_tokens()
    base = agg(tokens, (4, 4), loc=True)

    def changed(edit) -> torch.Tensor:
        t = tokens.clone()
        edit(t)
        chosen = select_neighbours(t, (4, 4), 4)[0][:, 0].sort(dim=-1).values.tolist()
        assert chosen == [sorted(EXPECTED_TOP4[0])] * 2  # the same positives for patch 0
        return agg(t, (4, 4), loc=True)

    # patch 9 = (2,1) lies outside the wrapped window of patch 0
    out = changed(lambda t: t[:, 9].mul_(-3.0).add_(1.0))
    torch.testing.assert_close(out[:, 1 + 0], base[:, 1 + 0])
    assert not torch.allclose(out[:, 0], base[:, 0])  # the image token attends to every patch
    # patch 1 is a candidate of patch 0 but not selected; making it less similar changes nothing
    out = changed(lambda t: t[:, 1].mul_(-1.0))
    torch.testing.assert_close(out[:, 1 + 0], base[:, 1 + 0])
    # patch 0 is never its own positive: a component orthogonal to the plane of all features keeps the ranking
    # of its cosines but changes patch 0's own LayerNorm'd token, which would show if it were attended
    orthogonal = torch.linalg.svd(tokens[0]).Vh[2]  # tokens span a 2-D plane; Vh[2] is orthogonal to it
    out = changed(lambda t: t[:, 0].add_(3.0 * orthogonal))
    torch.testing.assert_close(out[:, 1 + 0], base[:, 1 + 0])
    assert not torch.allclose(out[:, 0], base[:, 0])
    # a selected neighbour (15) does move the aggregate (scaling would not: the blocks are pre-LayerNorm)
    out = changed(lambda t: t[:, 15].add_(0.5 * orthogonal))
    assert not torch.allclose(out[:, 1 + 0], base[:, 1 + 0], atol=1e-4)


# ----------------------------------------------------------------------------------------- loss
def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("all_crops", [True, False])
def test_loss_matches_hand_computation(all_crops):
    torch.manual_seed(0)
    b, crops, dim, pdim = 2, 3, 5, 4
    patches = [4, 4, 2]  # two global crops with 2×2 patches, one local with 2 (the loss never sees the grid)
    s_cls, t_cls = torch.randn(crops * b, dim), torch.randn(crops * b, dim)
    s_pat = [torch.randn(b, n, pdim) for n in patches]
    t_pat = [torch.randn(b, n, pdim) for n in patches]
    loss_fn = SelfPatchLoss(dim, pdim, crops, np.array([0.04]), student_temp=0.1, center_momentum=0.9,
                            patch_loss_weight=0.1, center_from_all_crops=all_crops)
    loss_fn.center.fill_(0.5)
    loss_fn.patch_center.fill_(0.2)
    loss, logs = loss_fn(s_cls, t_cls, s_pat, t_pat, epoch=0)

    s, t = s_cls.numpy(), t_cls.numpy()
    image, pairs = 0.0, 0
    for iq in range(2):
        q = _softmax((t[iq * b:(iq + 1) * b] - 0.5) / 0.04)
        for v in range(crops):
            if v != iq:
                image += float(np.mean(np.sum(-q * np.log(_softmax(s[v * b:(v + 1) * b] / 0.1)), -1)))
                pairs += 1
    image /= pairs
    patch = 0.0
    for v in range(crops):  # same view only, every crop
        q = _softmax((t_pat[v].numpy() - 0.2) / 0.04)
        patch += float(np.mean(np.sum(-q * np.log(_softmax(s_pat[v].numpy() / 0.1)), -1)))
    patch /= crops
    assert pairs == 4
    assert math.isclose(logs["image_loss"], image, rel_tol=1e-5)
    assert math.isclose(logs["patch_loss"], patch, rel_tol=1e-5)
    assert math.isclose(loss.item(), image + 0.1 * patch, rel_tol=1e-5)
    # image centre: all crops (SelfPatch) or the 2 global crops (DINO)
    source = t if all_crops else t[:2 * b]
    np.testing.assert_allclose(loss_fn.center.numpy()[0], 0.9 * 0.5 + 0.1 * source.mean(0), rtol=1e-5)
    # patch centre: mean over every patch of every crop (global patches weigh more: 8 + 8 + 4 patches)
    all_patches = np.concatenate([p.numpy().reshape(-1, pdim) for p in t_pat])
    assert all_patches.shape[0] == 20
    np.testing.assert_allclose(loss_fn.patch_center.numpy()[0], 0.9 * 0.2 + 0.1 * all_patches.mean(0),
                               rtol=1e-5)


def test_uniform_outputs_give_log_dims():
    loss_fn = SelfPatchLoss(64, 8, 3, np.array([0.04]), 0.1, 0.9, 0.1, True)
    loss, logs = loss_fn(torch.zeros(6, 64), torch.zeros(6, 64), [torch.zeros(2, 4, 8)] * 3,
                         [torch.zeros(2, 4, 8)] * 3, 0)
    assert math.isclose(loss.item(), math.log(64) + 0.1 * math.log(8), rel_tol=1e-6)
    assert math.isclose(logs["patch_teacher_entropy"], math.log(8), rel_tol=1e-4)


# ----------------------------------------------------------------------------------------- method
def _batch(n: int = 2, size: int = 32, local: int = 24) -> dict:
    torch.manual_seed(1)
    return {"crops": [torch.randn(n, 3, size, size) for _ in range(2)] + [torch.randn(n, 3, local, local)] * 2}


def test_official_defaults_and_views(random_images):
    cfg = SelfPatchConfig()
    assert (cfg.global_crops_scale, cfg.local_crops_scale) == ((0.25, 1.0), (0.05, 0.25))
    assert (cfg.out_dim, cfg.out_dim_selfpatch, cfg.k_num, cfg.patch_loss_weight) == (65536, 4096, 4, 0.1)
    assert (cfg.neighbourhood_size, cfg.num_ca_blocks, cfg.drop_path_rate) == (3, 2, 0.1)
    method = _method()
    views = method.views()
    assert [(c.size, c.scale, c.count) for c in views.crops] == \
        [(32, (0.25, 1.0), 1), (32, (0.25, 1.0), 1), (24, (0.05, 0.25), 2)]
    sample = views(random_images[0])
    assert [c.shape[-1] for c in sample["crops"]] == [32, 32, 24, 24]


def test_backbone_has_no_cls_token_and_no_final_norm():
    method = _method()
    for wrapper in (method.student, method.teacher):
        backbone = wrapper.backbone
        assert backbone.num_prefix_tokens == 0 and backbone.cls_token is None
        assert isinstance(backbone.norm, torch.nn.Identity) and isinstance(backbone.fc_norm, torch.nn.Identity)
        assert backbone.pos_embed.shape == (1, 64, 128)  # (64 / 8)² patches, no extra slot


def test_invalid_configs_name_the_field():
    with pytest.raises(ConfigError, match="local_size=16"):
        _method(local_size=16)  # 2×2 patches: no 3×3 neighbourhood
    with pytest.raises(ConfigError, match="k_num=9"):
        _method(k_num=9)
    with pytest.raises(ConfigError, match="unknown field"):
        _method(k=4)


def test_gradients_reach_only_the_student_and_last_layers_frozen_in_epoch_zero():
    method = _method(norm_last_layer=True)
    loss, _ = method.loss(_batch(), epoch=0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    method.cancel_gradients(epoch=0)
    params = dict(method.student.named_parameters())
    for head in ("c_head", "p_head"):
        assert params[f"head.{head}.last_layer.parametrizations.weight.original1"].grad is None
        assert not params[f"head.{head}.last_layer.parametrizations.weight.original0"].requires_grad
        assert params[f"head.{head}.mlp.0.weight"].grad is not None
    assert params["head.ca_head.cls_token"].grad is not None
    assert params["backbone.patch_embed.proj.weight"].grad is not None
    # after epoch 0 the last layers train
    method.student.zero_grad(set_to_none=True)
    loss, _ = method.loss(_batch(), epoch=1)
    loss.backward()
    method.cancel_gradients(epoch=1)
    for head in ("c_head", "p_head"):
        assert params[f"head.{head}.last_layer.parametrizations.weight.original1"].grad is not None


def test_optimizer_step_changes_student_not_teacher_then_ema():
    method = _method()
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    watched = ["backbone.blocks.0.attn.qkv.weight", "head.ca_head.cls_token", "head.p_head.mlp.0.weight"]
    student_before = {k: v.detach().clone() for k, v in method.student.state_dict().items() if k in watched}
    opt = torch.optim.AdamW([p for p in method.student.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = method.loss(_batch(), epoch=1)
    loss.backward()
    opt.step()
    after = method.student.state_dict()
    for k in watched:
        assert not torch.equal(student_before[k], after[k]), k
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    m = 0.9
    method.update_teacher(m)
    for k in watched:
        expected = m * teacher_before[k] + (1 - m) * after[k]
        torch.testing.assert_close(method.teacher.state_dict()[k], expected)


def test_full_loss_backward_on_vit_tiny_p8_batch_two(random_images):
    method = _method(global_size=64, local_size=32)
    views = method.views()
    batch = default_collate([views(random_images[i]) for i in range(2)])
    assert [tuple(c.shape) for c in batch["crops"]] == [(2, 3, 64, 64)] * 2 + [(2, 3, 32, 32)] * 2
    with torch.no_grad():
        teacher_cls, teacher_patches = method.teacher(batch["crops"], loc=True)
    assert teacher_cls.shape == (8, 16)
    assert [tuple(p.shape) for p in teacher_patches] == [(2, 64, 8)] * 2 + [(2, 16, 8)] * 2
    loss, logs = method.loss(batch, epoch=1)
    assert torch.isfinite(loss)
    assert math.isclose(loss.item(), logs["image_loss"] + 0.1 * logs["patch_loss"], rel_tol=1e-5)
    assert logs["patch_loss"] > 0 and logs["image_loss"] > 0
    loss.backward()
    missing = [n for n, p in method.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in method.student.parameters() if p.grad is not None)
    assert torch.count_nonzero(method.criterion.patch_center) > 0  # patch centre moved


def test_export_is_the_teacher_backbone_and_round_trips(tmp_path):
    method = _method()
    with torch.no_grad():
        method.teacher.backbone.blocks[0].attn.qkv.weight.add_(1.0)  # make teacher ≠ student
    exported = method.export_backbone()
    torch.testing.assert_close(exported.blocks[0].attn.qkv.weight, method.teacher.backbone.blocks[0].attn.qkv.weight)
    assert exported.blocks[0].drop_path1.__class__.__name__ == "Identity"  # the teacher has no drop path
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, exported, "vit-tiny-p8", method.arch_kwargs, {})
    loaded, meta = load_backbone(path)
    assert meta["arch_kwargs"] == {"class_token": False, "final_norm": False}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(patch_tokens(loaded, x), patch_tokens(exported, x))
        assert patch_tokens(loaded, x).shape == (1, 128, 4, 4)


def test_extra_state_round_trip():
    method = _method()
    method.loss(_batch(), epoch=0)
    state = method.extra_state()
    assert set(state) == {"center", "patch_center"} and state["patch_center"].shape == (1, 8)
    fresh = _method()
    fresh.load_extra_state(state)
    torch.testing.assert_close(fresh.criterion.patch_center, method.criterion.patch_center)
    torch.testing.assert_close(fresh.criterion.center, method.criterion.center)
