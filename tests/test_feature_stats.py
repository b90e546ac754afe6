"""Effective rank: known answers on constructed features."""

from __future__ import annotations

import pytest
import torch

from densessl.evaluate.feature_stats import effective_rank


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
