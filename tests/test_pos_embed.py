"""Positional-embedding resampling (models/pos_embed.py) against values worked out by hand and against
independent NumPy implementations of the official formulas (DINO's bicubic ``F.interpolate`` with
``scale_factor`` (n + 0.1)/√N; scenic's ``jax.image.resize(..., 'bilinear')``, antialiased)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densessl.errors import ConfigError
from densessl.models.backbones import create_backbone
from densessl.models.pos_embed import ResampledViT, resample_grid


def ramp_grid(side: int) -> torch.Tensor:
    """(1, side, side, 2): channel 0 = row index, channel 1 = column index."""
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    return torch.stack([r, c], dim=-1)[None]


def test_dino_rule_hand_worked_on_a_ramp():
    # On a ramp the value is f + Σ_k k·w_k over the 4 cubic taps f-1..f+2 (Keys, A = -0.75), sampled at
    # src = (i + 0.5)/s - 0.5 with DINO's s = (n + 0.1)/√N. Row 2 of 4 → 6: s = 6.1/4, src = 1.13934,
    # t = 0.13934: w = (-0.07740, 0.95970, 0.13025, -0.01253) → 1 + 0.07740 + 0.13025 - 0.02507 = 1.18258.
    out = resample_grid(ramp_grid(4), (6, 5), "dino")
    assert out.shape == (1, 6, 5, 2)
    assert out[0, 2, 0, 0].item() == pytest.approx(1.18258, abs=2e-4)
    # The exact-size ratio 4/6 would sample src = 1.16667 and give 1.2130 (same kernel): a visible shift.
    assert abs(out[0, 2, 0, 0].item() - 1.2130) > 0.02
    # 4 → 3 (downsampling, no antialias): s = 3.1/4, centre src = 1.43548, t = 0.43548:
    # w = (-0.10414, 0.67654, 0.50784, -0.08029) → 1 + 0.10414 + 0.50784 - 0.16058 = 1.45140 (not 1.5).
    down = resample_grid(ramp_grid(4), (3, 3), "dino")
    assert down[0, 1, 1, 0].item() == pytest.approx(1.45140, abs=2e-4)
    assert down[0, 1, 1, 1].item() == pytest.approx(1.45140, abs=2e-4)


def test_scenic_rule_hand_worked_on_a_ramp():
    # 4 → 3 bilinear with antialias: triangle kernel widened by 4/3; centre j samples (j + 0.5)·4/3 - 0.5.
    # j = 0 samples 1/6: taps 0 (weight 1 - (1/6)/(4/3) = 0.875) and 1 (1 - (5/6)/(4/3) = 0.375), normalised:
    # 0.375 / 1.25 = 0.3. j = 1 samples 1.5: taps 1 and 2 equally → 1.5. j = 2 mirrors j = 0 → 2.7.
    out = resample_grid(ramp_grid(4), (3, 3), "scenic")
    assert out[0, 0, :, 1].tolist() == pytest.approx([0.3, 1.5, 2.7], abs=1e-5)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.3, 1.5, 2.7], abs=1e-5)
    # without antialias the first sample would be 1/6
    assert abs(out[0, 0, 0, 1].item() - 1 / 6) > 0.1


def test_native_grid_is_returned_unchanged_and_unknown_rule_is_refused():
    g = torch.randn(1, 4, 4, 3)
    for mode in ("dino", "scenic", "timm"):
        assert resample_grid(g, (4, 4), mode) is g
    with pytest.raises(ConfigError, match="pos_resample"):
        resample_grid(g, (3, 3), "nearest")
    with pytest.raises(ConfigError, match="pos_resample"):
        create_backbone("vit-tiny-p8", pos_resample="area")


# ---- independent NumPy implementations of the official formulas ----------------------------------------


def dino_bicubic_matrix(n: int, scale: float) -> np.ndarray:
    """torch bicubic (A = -0.75, align_corners=False, border taps clamped) with a given scale factor:
    out = floor(n · scale), src = (i + 0.5) / scale - 0.5."""
    a = -0.75
    out = int(math.floor(n * scale))
    m = np.zeros((out, n))
    for i in range(out):
        src = (i + 0.5) / scale - 0.5
        f = math.floor(src)
        t = src - f

        def cubic(x: float) -> float:
            x = abs(x)
            if x <= 1:
                return ((a + 2) * x - (a + 3)) * x * x + 1
            if x < 2:
                return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
            return 0.0

        for k in range(-1, 3):
            m[i, min(max(f + k, 0), n - 1)] += cubic(k - t)
    return m


def jax_bilinear_matrix(n: int, out: int) -> np.ndarray:
    """jax.image.scale_and_translate weights (triangle kernel, antialias=True): kernel widened by
    max(n/out, 1), sample (i + 0.5)·n/out - 0.5, weights normalised per output sample."""
    inv = n / out
    kscale = max(inv, 1.0)
    sample = (np.arange(out) + 0.5) * inv - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(sample[:, None] - np.arange(n)[None, :]) / kscale)
    return w / w.sum(1, keepdims=True)


def dino_reference(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    n = grid.shape[0]
    side = math.sqrt(n * n)
    mh, mw = dino_bicubic_matrix(n, (h + 0.1) / side), dino_bicubic_matrix(n, (w + 0.1) / side)
    return np.einsum("ia,jb,abd->ijd", mh, mw, grid)


def scenic_reference(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    n = grid.shape[0]
    return np.einsum("ia,jb,abd->ijd", jax_bilinear_matrix(n, h), jax_bilinear_matrix(n, w), grid)


@pytest.mark.parametrize("hw", [(6, 14), (10, 14), (14, 20), (5, 5)])
def test_rules_match_independent_implementations(hw):
    g = np.random.default_rng(0).standard_normal((14, 14, 8)).astype(np.float32)
    t = torch.from_numpy(g)[None]
    np.testing.assert_allclose(resample_grid(t, hw, "dino")[0].numpy(), dino_reference(g.astype(np.float64), *hw),
                               atol=1e-5)
    np.testing.assert_allclose(resample_grid(t, hw, "scenic")[0].numpy(),
                               scenic_reference(g.astype(np.float64), *hw), atol=1e-5)


def test_backbone_uses_its_rule_in_forward_features():
    """The resampled embedding is what forward_features adds: a class-token ViT at 40×56 px (5×7 grid)."""
    torch.manual_seed(0)
    model = create_backbone("vit-tiny-p8").eval()
    assert isinstance(model, ResampledViT) and model.pos_resample == "dino"
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        ours = model.forward_features(x)
        pos = model.pos_embed
        expected = torch.from_numpy(dino_reference(pos[0, 1:].reshape(8, 8, -1).double().numpy(), 5, 7)).float()
        assert torch.allclose(model.resampled_pos_embed(5, 7)[0, 1:].reshape(5, 7, -1), expected, atol=1e-5)
        model.pos_resample = "timm"
        timm_tokens = model.forward_features(x)
    assert ours.shape == (1, 1 + 35, model.embed_dim)
    assert (ours - timm_tokens).abs().max() > 1e-3  # the rule reaches the tokens
    loca = create_backbone("vit-tiny-p8", class_token=False, gelu_tanh=True, pos_resample="scenic")
    assert loca.resampled_pos_embed(3, 3).shape == (1, 9, loca.embed_dim)
