"""Effective rank: known answers on constructed features."""

from __future__ import annotations

import pytest
import torch

from densessl.evaluate.feature_stats import colour_explained_share, effective_rank, position_share


def test_equal_variance_directions_count_exactly():
    # k orthogonal directions of equal variance: the eigenvalues are k equal values, so exp(H) = k
    for k in (1, 3, 8):
        signs = torch.tensor([[1.0], [-1.0]]).repeat(1, k)  # two points per direction, mean 0
        rows = torch.cat([torch.diag_embed(s) for s in signs]).reshape(-1, k)  # ±e_i
        features = torch.cat([rows, torch.zeros(len(rows), 16 - k)], 1)
        assert effective_rank(features) == pytest.approx(k, rel=1e-9)


def test_unequal_variances_give_the_entropy_value():
    # variances 3 and 1 on two axes: p = (0.75, 0.25), rank = exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548
    x = torch.tensor([[3**0.5, 0.0], [-(3**0.5), 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert effective_rank(x) == pytest.approx(1.7547654, rel=1e-6)


def test_offset_and_chunking_do_not_matter_and_degenerate_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 12, generator=g) @ torch.randn(12, 12, generator=g)
    whole = effective_rank(x)
    assert effective_rank(x + 5.0) == pytest.approx(whole, rel=1e-6)  # centred
    assert effective_rank(x, chunk_rows=7) == pytest.approx(whole, rel=1e-9)
    assert 1.0 < whole < 12.0
    assert effective_rank(torch.ones(10, 4)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        effective_rank(torch.ones(1, 4))


def test_position_share_of_a_pure_positional_code_and_of_pure_content():
    g = torch.Generator().manual_seed(0)
    code = torch.randn(1, 16, 8, generator=g).repeat(5, 1, 1)  # same tokens at each position in every image
    assert position_share(code) == pytest.approx(1.0)
    content = torch.randn(5, 1, 8, generator=g).repeat(1, 16, 1)  # constant within an image
    assert position_share(content) == pytest.approx(0.0, abs=1e-12)


def test_colour_share_of_tokens_made_from_colour_and_of_unrelated_tokens():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    mean = torch.nn.functional.avg_pool2d(images, 8).flatten(2).transpose(1, 2)  # (6, 16, 3)
    made = mean @ torch.randn(3, 10, generator=g) + 0.5 * mean[..., :1] ** 2
    assert colour_explained_share(made, images, 8) == pytest.approx(1.0, abs=1e-9)
    unrelated = torch.randn(6, 16, 10, generator=g)
    assert colour_explained_share(unrelated, images, 8) < 0.2  # 13 regressors on 96 samples: chance level
    with pytest.raises(ValueError, match="patches per image"):
        colour_explained_share(made, images, 4)


def test_feature_stats_of_a_backbone_on_patchseg_data(tmp_path):
    from test_patchseg import write_coco

    from densessl.evaluate.patchseg import PatchSegConfig
    from densessl.models.backbones import create_backbone
    from densessl.stages.feature_stats import backbone_feature_stats, format_rows

    torch.manual_seed(0)
    stats = backbone_feature_stats(create_backbone("vit-tiny-p8"), write_coco(tmp_path / "c"),
                                   PatchSegConfig(dataset="coco"), num_images=3)
    assert stats["images"] == 3 and 1.0 <= stats["effective_rank"] <= 128
    # the fixture's patches are solid colours, so a random ViT's tokens are mostly their colour
    assert 0.5 < stats["colour_explained_share"] <= 1.0 and 0.0 <= stats["position_share"] < 0.5
    assert "eff. rank" in format_rows([{"run": "r", **stats}])


def test_unknown_protocol_names_the_flag():
    from conftest import REPO

    from densessl.config import load_config
    from densessl.errors import ConfigError
    from densessl.stages.feature_stats import run_feature_stats

    cfg = load_config([REPO / "config.yaml"], root=REPO)
    with pytest.raises(ConfigError, match="--protocol 'davis2017'.*patchseg_coco"):
        run_feature_stats(cfg, 8, "davis2017")
