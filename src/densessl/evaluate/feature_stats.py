"""Feature diagnostics that explain a probe's number: how many directions the frozen features use.

Why: at smoke scale three dense methods trained away from their step-0 networks and scored lower on Patch-Seg.
Their patch tokens had lost dimensions (effective rank of LOCA's student 21.5 → 10.8 after 186 steps, GTSA
16.6 → 14.5, SelfPatch 12.8 → 10.5) while DINO's grew (16.6 → 21.2), so the Patch-Seg table shows this number
next to each score: a drop below the random-init rows reads as (partial) dimensional collapse, not as an
evaluation fault.
"""

from __future__ import annotations

import torch


def effective_rank(features: torch.Tensor, chunk_rows: int = 65536) -> float:
    """Entropy effective rank (Roy & Vetterli, 2007) of the rows of ``features`` (..., D), after centring:
    exp(H(p)) with p the normalised eigenvalues of the feature covariance. D independent equal-variance
    directions give D, a single direction 1. The covariance is accumulated in float64 over row chunks, so the
    cost is one pass and a D x D eigen-decomposition whatever the number of tokens."""
    x = features.reshape(-1, features.shape[-1])
    if x.shape[0] < 2:
        raise ValueError(f"effective_rank needs at least 2 feature vectors, got {x.shape[0]}")
    d = x.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_rows):
        part = x[start:start + chunk_rows].to("cpu", torch.float64)
        total += part.sum(0)
        gram += part.T @ part
    n = x.shape[0]
    mean = total / n
    cov = gram / n - torch.outer(mean, mean)
    eig = torch.linalg.eigvalsh(cov).clamp_min(0.0)
    if float(eig.sum()) <= 0.0:
        return 0.0  # constant features: no direction at all
    p = eig / eig.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _centred(tokens: torch.Tensor) -> torch.Tensor:
    t = tokens.to(torch.float64)
    return t - t.reshape(-1, t.shape[-1]).mean(0)


def colour_explained_share(tokens: torch.Tensor, images: torch.Tensor, patch_size: int) -> float:
    """Share of the variance of patch tokens (N, P, D) that the patch's own colour statistics explain.

    Least squares from, per patch, the mean of each (normalised) channel, their pairwise products and squares,
    and each channel's variance (plus a constant) to the D token values; 1 − residual / total. A random ViT
    keeps much of its input's local colour; a representation that learns semantics should lower this share,
    one that latches onto appearance shared by two views of the same place raises it
    (docs/learning_signal.md). ``images`` (N, 3, H, W) are what the backbone saw; the grid is H // patch_size
    per side.
    """
    n, p, d = tokens.shape
    x = images.to(torch.float64)
    mean = torch.nn.functional.avg_pool2d(x, patch_size).flatten(2).transpose(1, 2).reshape(-1, 3)
    var = (torch.nn.functional.avg_pool2d(x * x, patch_size).flatten(2).transpose(1, 2).reshape(-1, 3)
           - mean * mean)
    if mean.shape[0] != n * p:
        raise ValueError(f"{mean.shape[0] // n} patches per image from the images, {p} tokens per image: give "
                         f"the images the backbone saw and its patch size")
    i, j = torch.triu_indices(3, 3)
    design = torch.cat([mean, mean[:, i] * mean[:, j], var, torch.ones(n * p, 1, dtype=torch.float64)], 1)
    target = _centred(tokens).reshape(-1, d)
    solution = torch.linalg.lstsq(design, target).solution
    total = target.pow(2).sum()
    return float(1.0 - (target - design @ solution).pow(2).sum() / total) if total > 0 else 0.0


def position_share(tokens: torch.Tensor) -> float:
    """Share of the variance of patch tokens (N, P, D) carried by the patch position alone (the per-position
    mean over images): near 0 when tokens describe content, 1 for a pure positional code."""
    t = _centred(tokens)
    total = t.pow(2).sum(-1).mean()
    return float(t.mean(0).pow(2).sum(-1).mean() / total) if total > 0 else 0.0
