"""Patch-Seg's intervention heads ``transformer-cls`` / ``transformer-separate`` (official
``TransformerIntervention``, iancovert/patch-seg @ fc14f36 ``patchseg/model.py``): shapes, which backbone
tokens reach them, parameter counts by hand, the union-only rule, and that they learn tasks with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_patchseg import write_coco  # the solid-colour COCO-Stuff fixture
from torch import nn

from densessl.config import load_config, load_yaml
from densessl.errors import ConfigError
from densessl.evaluate.patchseg import PatchSegConfig, run_patchseg
from densessl.evaluate.patchseg_features import extract_features
from densessl.evaluate.patchseg_heads import (
    HEADS,
    TransformerHead,
    TransformerIntervention,
    build_head,
    feature_mode,
)
from densessl.evaluate.patchseg_loss import patchseg_loss
from densessl.models.backbones import create_backbone
from densessl.protocol_names import PATCHSEG_HEADS, patchseg_grid

D, HEADS_N, P, C = 32, 4, 16, 3  # width, attention heads, patches, classes of the tensor-level tests


class TokenBackbone(nn.Module):
    """A stand-in backbone whose ``forward_features`` returns the tokens it is given as the image."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _head(name: str, prefix: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_head(name, "union", D, HEADS_N, prefix, P, C, hidden_size=8, num_layers=2).eval()


def _predict(name: str, prefix: int, tokens: torch.Tensor, head: nn.Module) -> torch.Tensor:
    feats = extract_features(TokenBackbone(prefix), tokens, feature_mode(name, "union", prefix))
    with torch.no_grad():
        return head(feats)


# ---------------------------------------------------------------- token modes and shapes

def test_feature_modes_are_the_official_prepare_backbone() -> None:
    # scripts/train.py prepare_backbone: -cls reads the prefix token (token mean without one), -separate all
    assert feature_mode("transformer-cls", "union", 1) == "keep_prefix"
    assert feature_mode("transformer-cls", "union", 0) == "mean"
    assert feature_mode("transformer-separate", "union", 1) == "keep_all"
    assert feature_mode("transformer-separate", "union", 0) == "keep_all"
    assert feature_mode("transformer", "union", 1) == "keep_all"


@pytest.mark.parametrize("name,prefix,tokens_in", [("transformer-cls", 1, 1), ("transformer-cls", 0, 1),
                                                   ("transformer-separate", 1, 1 + P),
                                                   ("transformer-separate", 0, P)])
def test_intervention_heads_output_one_prediction_per_patch(name: str, prefix: int, tokens_in: int) -> None:
    head = _head(name, prefix)
    assert isinstance(head, TransformerIntervention) and head.num_latent_tokens == P
    tokens = torch.randn(2, prefix + P, D)
    feats = extract_features(TokenBackbone(prefix), tokens, feature_mode(name, "union", prefix))
    assert feats.shape == (2, tokens_in, D)
    assert head(feats).shape == (2, P, C)


# ---------------------------------------------------------------- which tokens reach the head

def test_cls_head_sees_only_the_prefix_token() -> None:
    head = _head("transformer-cls", 1)
    tokens = torch.randn(3, 1 + P, D)
    out = _predict("transformer-cls", 1, tokens, head)
    other_patches = tokens.clone()
    other_patches[:, 1:] = torch.randn(3, P, D)
    assert torch.equal(_predict("transformer-cls", 1, other_patches, head), out)
    other_cls = tokens.clone()
    other_cls[:, 0] = torch.randn(3, D)
    assert not torch.allclose(_predict("transformer-cls", 1, other_cls, head), out, atol=1e-4)


def test_cls_head_without_prefix_sees_only_the_token_mean() -> None:
    head = _head("transformer-cls", 0)
    tokens = torch.randn(2, P, D)
    out = _predict("transformer-cls", 0, tokens, head)
    same_mean = tokens.clone()
    shift = torch.randn(2, 1, D)
    same_mean[:, 0] += shift[:, 0]
    same_mean[:, 1] -= shift[:, 0]  # two tokens changed, their mean kept
    torch.testing.assert_close(_predict("transformer-cls", 0, same_mean, head), out)
    changed = tokens.clone()
    changed[:, 0] += shift[:, 0]
    assert not torch.allclose(_predict("transformer-cls", 0, changed, head), out, atol=1e-4)


def test_separate_head_sees_every_token_but_not_their_order() -> None:
    """No positional embedding is added to the backbone tokens (official ``TransformerIntervention``), so the
    prediction is a function of the set of tokens: reordering them changes nothing; the ``transformer`` head,
    which adds its own positional embedding per token, is not order-blind."""
    head = _head("transformer-separate", 1)
    tokens = torch.randn(2, 1 + P, D)
    out = _predict("transformer-separate", 1, tokens, head)
    for i in (0, 1, P):  # the prefix token and two patch tokens each reach the prediction
        changed = tokens.clone()
        changed[:, i] = torch.randn(2, D)
        assert not torch.allclose(_predict("transformer-separate", 1, changed, head), out, atol=1e-4)
    perm = torch.randperm(1 + P, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_predict("transformer-separate", 1, tokens[:, perm], head), out,
                               rtol=1e-4, atol=1e-5)
    # the transformer head: reordering the patch tokens does not just reorder its per-patch outputs
    patches = torch.randperm(P, generator=torch.Generator().manual_seed(1))
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + patches])
    plain = _head("transformer", 1)
    with torch.no_grad():
        assert not torch.allclose(plain(tokens[:, order]), plain(tokens)[:, patches], atol=1e-4)
        plain.pos_embed.zero_()  # without its positional embedding it would be (the control)
        torch.testing.assert_close(plain(tokens[:, order]), plain(tokens)[:, patches], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- parameters by hand

def test_parameter_counts_by_hand() -> None:
    # one timm Block, width d, qkv_bias False, LayerScale, mlp_ratio 4: norm1 2d + qkv 3d^2 + proj d^2 + d
    # + ls1 d + norm2 2d + fc1 4d^2 + 4d + fc2 4d^2 + d + ls2 d = 12 d^2 + 12 d
    d, p, c, layers = 128, 64, 183, 2  # the smoke ViT (64 px, patch 8) on COCO-Stuff's 183 classes
    block = 12 * d * d + 12 * d  # 198,144
    intervention = p * d + 2 * d + layers * block + 2 * d + d * c + c  # latents, norm_pre, blocks, norm, head
    assert intervention == 428_599
    for name in ("transformer-cls", "transformer-separate"):
        head = build_head(name, "union", d, 4, 1, p, c, hidden_size=1024, num_layers=layers)
        assert sum(t.numel() for t in head.parameters()) == intervention
        assert head.latent_embed.shape == (p, d)
    plain = build_head("transformer", "union", d, 4, 1, p, c, hidden_size=1024, num_layers=layers)
    assert isinstance(plain, TransformerHead)
    assert sum(t.numel() for t in plain.parameters()) == intervention + d  # pos_embed also covers the CLS slot


def test_latents_and_layer_scale_are_initialised_as_the_official_module() -> None:
    torch.manual_seed(0)
    head = TransformerIntervention(4096, 64, 4, 3, 1)
    assert head.latent_embed.std().item() == pytest.approx(0.02, rel=0.05)  # randn * 0.02
    assert torch.all(head.blocks[0].ls1.gamma == 0.01) and torch.all(head.blocks[0].ls2.gamma == 0.01)
    assert head.blocks[0].attn.qkv.bias is None and head.blocks[0].attn.num_heads == 4


# ---------------------------------------------------------------- union only

@pytest.mark.parametrize("head", ["transformer-cls", "transformer-separate"])
@pytest.mark.parametrize("reduction", ["majority", "global-union"])
def test_intervention_heads_are_refused_without_union_labels(head: str, reduction: str) -> None:
    with pytest.raises(ConfigError, match="label_reduction: union"):
        PatchSegConfig(head=head, label_reduction=reduction)
    with pytest.raises(ConfigError, match="only with label_reduction: union"):
        build_head(head, reduction, D, HEADS_N, 1, P, C, hidden_size=8, num_layers=2)


def test_grid_names_the_union_points_and_the_config_refuses_the_others(tmp_path: Path) -> None:
    grid = patchseg_grid("patchseg_coco")
    assert len(grid) == 11
    assert {"patchseg_coco.union-transformer-cls", "patchseg_coco.union-transformer-separate"} <= set(grid)
    assert not any(n.endswith(("-cls", "-separate")) and ".union-" not in n for n in grid)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"results_dir": str(tmp_path / "r"),
                                "evaluations": ["patchseg_ade20k.union-transformer-separate"]}))
    cfg = load_config([path])
    assert {p for p, _ in cfg.evaluation_jobs()} == {"patchseg_ade20k.union-transformer-separate"}
    path.write_text(json.dumps({"evaluations": ["patchseg_coco.majority-transformer-cls"]}))
    with pytest.raises(ConfigError, match="transformer-cls.*label_reduction: union"):
        load_config([path])
    path.write_text(json.dumps({"evaluations": ["patchseg_coco"],
                                "evaluate": {"patchseg": {"head": "transformer-cls",
                                                          "label_reduction": "global-union"}}}))
    with pytest.raises(ConfigError, match="label_reduction: union"):
        load_config([path])
    path.write_text(json.dumps({"evaluations": ["patchseg_coco"], "evaluate": {"patchseg": {"head": "cnn"}}}))
    with pytest.raises(ConfigError, match="transformer-separate"):  # the schema lists the heads
        load_config([path])


def test_schema_and_protocol_names_list_the_probe_heads() -> None:
    schema = load_yaml(Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    block = schema["properties"]["evaluate"]["properties"]["patchseg"]["properties"]
    assert tuple(block["head"]["enum"]) == HEADS == PATCHSEG_HEADS


# ---------------------------------------------------------------- learning tasks with a known answer

def _train(head: nn.Module, batch: object, steps: int = 150) -> tuple[float, float]:
    """(accuracy before, after) of per-patch argmax predictions on 256 held-out examples; official loss
    (union BCE), AdamW at the official lr 1e-3."""
    xv, yv = batch(256)  # type: ignore[operator]

    def accuracy() -> float:
        with torch.no_grad():
            return (head(xv).argmax(-1) == yv).float().mean().item()

    before = accuracy()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        x, y = batch(32)  # type: ignore[operator]
        loss = patchseg_loss(head(x), nn.functional.one_hot(y, C), "union", None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, accuracy()


def cls_task(seed: int) -> tuple[float, float, float]:
    """Each image is one of 4 types; its global token is the type's code (plus noise) and each type has its
    own fixed layout of 3 classes over 16 patches. Returns (accuracy before, after, best accuracy from the
    patch position alone)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    codes, layouts = torch.randn(4, D, generator=g), torch.randint(0, C, (4, P), generator=g)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(0, 4, (n,), generator=g)
        return (codes[k] + 0.1 * torch.randn(n, D, generator=g))[:, None], layouts[k]

    position_only = sum(torch.bincount(layouts[:, p], minlength=C).max().item() for p in range(P)) / (4 * P)
    return (*_train(_head("transformer-cls", 1, seed), batch), position_only)


def separate_task(seed: int) -> tuple[float, float]:
    """Patch token p = position code p + the code of its (random) class; the prefix token is noise. Latent
    token p must find the backbone token that carries position code p. Returns (accuracy before, after)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    positions, classes = torch.randn(P, D, generator=g), torch.randn(C, D, generator=g)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, C, (n, P), generator=g)
        return torch.cat([torch.randn(n, 1, D, generator=g), positions + classes[y]], 1), y

    return _train(_head("transformer-separate", 1, seed), batch)


def test_cls_head_paints_a_layout_from_the_global_token_alone() -> None:
    """The answer needs both the global token (which type) and the latent tokens (which patch). Measured
    (``cls_task``, seeds 0-3): 23-42 % of patches right before training, 100 % after 150 steps; from the
    position alone at best 53-58 %."""
    before, after, position_only = cls_task(0)
    assert position_only == pytest.approx(36 / 64)
    assert before < 0.5 and after > 0.95


def test_separate_head_reads_each_patch_from_its_token() -> None:
    """Chance is 1/3. Measured (``separate_task``, seeds 0-3): 31-35 % right before training, 100 % after
    150 steps."""
    before, after = separate_task(0)
    assert before < 0.45 and after > 0.95


# ---------------------------------------------------------------- through the probe

@pytest.mark.parametrize("name,mode,tokens", [("transformer-cls", "keep_prefix", 1),
                                              ("transformer-separate", "keep_all", 65)])
def test_probe_runs_the_intervention_heads(tmp_path: Path, name: str, mode: str, tokens: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import densessl.evaluate.patchseg as patchseg

    inputs: list[tuple[int, ...]] = []
    original = patchseg.build_head

    def recording(*args: object, **kwargs: object) -> nn.Module:
        head = original(*args, **kwargs)  # type: ignore[arg-type]
        head.register_forward_pre_hook(lambda _m, a: inputs.append(tuple(a[0].shape)))
        return head

    monkeypatch.setattr(patchseg, "build_head", recording)
    root = write_coco(tmp_path / "coco")
    torch.manual_seed(0)
    cfg = PatchSegConfig(dataset="coco", head=name, label_reduction="union", batch_size=4, epochs=1, lr=1e-3,
                         warmup_steps=0, precision="fp32", num_layers=1)
    r = run_patchseg(create_backbone("vit-tiny-p8"), root, cfg)
    assert (r["output_head"], r["feature_mode"], r["grid_size"]) == (name, mode, 8)
    assert set(inputs) == {(4, tokens, 128)}  # 8 train, 4 val images in batches of 4
    assert 0.0 <= r["macro_recall"] <= 1.0 and r["size_stratified"] is not None
