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
