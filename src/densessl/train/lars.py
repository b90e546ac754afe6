"""LARS as CLoVE and PixPro use it: SGD with momentum whose gradients are rescaled per parameter tensor.

Follows the official ``contrast/lars.py`` (sthalles/CLoVE @ d706573, identical in zdaxie/PixPro), which
wraps ``torch.optim.SGD(momentum=0.9)`` and, before SGD's step, rewrites every gradient
(``--optimizer lars``; trust coefficient 1e-3, eps 1e-8):

1. weight decay enters the gradient: g ← ∇ + wd·θ (only in groups with wd > 0);
2. LARS scaling, for parameters not excluded: g ← g · η·‖θ‖ / (‖g‖ + ε) with trust coefficient η = 1e-3 and
   ε = 1e-8; the factor is 1 when ‖θ‖ or ‖g‖ is 0 (``LARS.apply_adaptive_lrs``);
3. plain SGD with momentum and no weight decay: b ← μ·b + g (b = g at the first step), θ ← θ − lr·b.

Excluded from both weight decay and scaling: the 1-D parameters (biases, BatchNorm γ/β), which the official
``add_weight_decay`` puts in a group with ``weight_decay=0`` and ``ignore=True``. Here one optimiser class does
the three steps (so ``state_dict``/``param_groups`` behave as any torch optimiser's, which the shared trainer
relies on); a group's ``lars_exclude`` flag decides step 2: ``True``/``False`` force it, ``None`` (default)
excludes tensors with ``ndim <= 1``, the official split. The gradients themselves are left untouched (the
official code overwrites ``p.grad``; nothing reads it afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def lars_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``contrast/lars.py::add_weight_decay``: 1-D parameters get no weight decay and no LARS scaling.

    The decayed group comes first so that a trainer that schedules ``param_groups[0]['weight_decay']``
    (densessl's shared trainer, DINO style) schedules the right one.
    """
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD + momentum with LARS gradient rescaling (see the module docstring for the exact update)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coef: float = 1e-3, eps: float = 1e-8,
                 lars_exclude: bool | None = None) -> None:
        # defaults: --momentum 0.9 (contrast/option.py); trust_coef 0.001, eps 1e-8 (contrast/lars.py LARS)
        if lr < 0:
            raise ValueError(f"LARS: lr must be ≥ 0, got {lr}")
        if eps < 0:
            raise ValueError(f"LARS: eps must be ≥ 0, got {eps}")
        if trust_coef < 0:
            raise ValueError(f"LARS: trust_coef must be ≥ 0, got {trust_coef}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, eps=eps,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @staticmethod
    def _excluded(group: dict[str, Any], p: torch.Tensor) -> bool:
        flag = group.get("lars_exclude")
        return p.ndim <= 1 if flag is None else bool(flag)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            trust_coef, eps = group["trust_coef"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if wd > 0:  # "Add weight decay before computing adaptive LR" (contrast/lars.py)
                    d_p = d_p.add(p, alpha=wd)
                if not self._excluded(group, p):
                    param_norm = torch.linalg.vector_norm(p)
                    grad_norm = torch.linalg.vector_norm(d_p)
                    ratio = trust_coef * param_norm / (grad_norm + eps)
                    ratio = torch.where((param_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))
                    d_p = d_p.mul(ratio)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:  # torch.optim.SGD: the first buffer is the gradient itself
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)
        return loss
