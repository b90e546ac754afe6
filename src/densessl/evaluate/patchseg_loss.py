"""Patch-Seg losses: the official ``UnionLoss`` / ``MajorityLoss`` / ``GlobalUnionLoss`` (iancovert/patch-seg @
fc14f36 ``patchseg/loss.py``), with the optional class weights of ``class_balanced`` (not official; see
``patchseg.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densessl.evaluate.patchseg_features import FeatureSource


def class_weights(source: FeatureSource, reduction: str, num_classes: int, max_weight: float) -> torch.Tensor:
    """``pos_weight`` (BCE: neg_c / pos_c) or CE weights (N / (K n_c)) from the training targets."""
    pos = torch.zeros(num_classes, dtype=torch.float64)
    total = 0
    for targets in source.all_targets():
        if reduction == "majority":
            pos += torch.bincount(targets.reshape(-1).long(), minlength=num_classes).double()
            total += targets.numel()
        else:
            flat = targets.reshape(-1, num_classes)
            pos += flat.double().sum(0)
            total += flat.shape[0]
    w = torch.ones(num_classes, dtype=torch.float64)
    seen = pos > 0
    if reduction == "majority":
        w[seen] = total / (int(seen.sum()) * pos[seen])
    else:
        w[seen] = (total - pos[seen]) / pos[seen]
    return w.clamp(max=max_weight).float()


def patchseg_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str,
                  weight: torch.Tensor | None) -> torch.Tensor:
    """Official ``UnionLoss`` / ``MajorityLoss`` / ``GlobalUnionLoss`` (+ optional class weights)."""
    c = logits.shape[-1]
    if reduction == "majority":
        return F.cross_entropy(logits.reshape(-1, c), targets.reshape(-1).long(), weight=weight)
    if reduction == "global-union":
        logits = logits[:, 0]
    return F.binary_cross_entropy_with_logits(logits.reshape(-1, c), targets.reshape(-1, c).to(logits.dtype),
                                              pos_weight=weight)
