"""Optimiser groups, gradient clipping and optimiser construction shared by every pretraining method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from densessl.errors import ConfigError, DenseSSLError
from densessl.methods.base import PretrainMethod

OPTIMIZERS = ("adamw", "sgd", "lars")
CLIP_MODES = ("per_parameter", "global_norm")


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """DINO ``utils.get_params_groups``: no weight decay on biases and norm parameters (ndim ≤ 1)."""
    regularized, not_regularized = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _method_param_groups(method: PretrainMethod, student: nn.Module) -> list[dict[str, Any]]:
    """The method's ``param_groups()`` if it has one, else DINO's; checked to cover exactly the student.

    A trainable parameter outside the student would never be averaged across GPUs by DDP, and one left out of
    every group would never move: both are errors rather than silent non-training.
    """
    hook = getattr(method, "param_groups", None)
    groups = [dict(g) for g in hook()] if callable(hook) else param_groups(student)
    student_params = {id(p): name for name, p in student.named_parameters()}
    trainable = {id(p): name for name, p in student.named_parameters() if p.requires_grad}
    seen: set[int] = set()
    for i, group in enumerate(groups):
        if "params" not in group:
            raise DenseSSLError(f"{type(method).__name__}.param_groups(): group {i} has no 'params' key")
        group["params"] = list(group["params"])
        for p in group["params"]:
            if id(p) not in student_params:
                raise DenseSSLError(f"{type(method).__name__}.param_groups(): group {i} holds a parameter of shape "
                                    f"{tuple(p.shape)} that is not a parameter of method.student; "
                                    f"DDP averages only the student's gradients, so move it into the student")
            seen.add(id(p))
    missing = [name for key, name in trainable.items() if key not in seen]
    if missing:
        raise DenseSSLError(f"{type(method).__name__}.param_groups() leaves out trainable student parameters "
                            f"{missing[:5]}{' …' if len(missing) > 5 else ''}; add them to a group or set "
                            f"requires_grad=False")
    for group in groups:
        group.setdefault("wd_schedule", group.get("weight_decay") != 0.0)
        group.setdefault("lr_scale", 1.0)
    return groups


def clip_gradients_per_parameter(module: nn.Module, clip: float) -> None:
    """DINO ``utils.clip_gradients``: each parameter's gradient norm is clipped separately, not globally.

    The official loop tests ``clip_coef < 1`` in Python, one device sync per parameter; multiplying by
    ``min(clip_coef, 1)`` instead gives bit-identical gradients (x · 1.0 = x) without leaving the device.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefs = torch.clamp(clip / (norms.float() + 1e-6), max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for g, c in zip(grads, coefs.unbind(), strict=True)])


def clip_gradients_global_norm(module: nn.Module, clip: float) -> None:
    """LOCA's ``clip_grads``: scale every gradient by ``clip / ‖g‖`` when the norm ‖g‖ over all of them exceeds
    ``clip``. Under DDP the gradients are already averaged, so every rank computes the same norm. torch's
    ``clip_grad_norm_`` divides by ‖g‖ + 1e-6 where jax divides by ‖g‖: a relative difference below 1e-6."""
    grads = [p for p in module.parameters() if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grad_norm_(grads, clip, norm_type=2.0)


def clip_gradients(module: nn.Module, clip: float, mode: str) -> None:
    """Clip the student's gradients the way its method's official code does (``TrainConfig.clip_mode``)."""
    if mode == "global_norm":
        clip_gradients_global_norm(module, clip)
    else:
        clip_gradients_per_parameter(module, clip)


def resolve_optimizer_name(configured: str | None, method: PretrainMethod | type[PretrainMethod]) -> str:
    """``train.optimizer`` if set, else the method's ``optimizer_name``, else DINO's adamw."""
    name = configured if configured is not None else getattr(method, "optimizer_name", None) or "adamw"
    if name not in OPTIMIZERS:
        source = "train.optimizer" if configured is not None else f"{getattr(method, 'name', method)}.optimizer_name"
        raise ConfigError(f"{source}: {name!r} is not supported; use one of {list(OPTIMIZERS)}")
    return name


def build_optimizer(name: str, groups: list[dict[str, Any]], fused: bool = False) -> torch.optim.Optimizer:
    """lr and weight decay are set by the schedules before every step; only the fixed settings live here.

    ``fused`` (``train.fused_adamw`` on CUDA): AdamW's update as one fused kernel over every parameter instead
    of torch's per-tensor (foreach) kernels, the same update rule; it applies to adamw only (SGD and LARS keep
    their official implementations) and needs every parameter on a GPU, so the trainer passes it on CUDA only.
    """
    if name == "adamw":
        # DINO: torch.optim.AdamW(params_groups), torch defaults
        return torch.optim.AdamW(groups, fused=True) if fused else torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)  # DINO: SGD(params_groups, lr=0, momentum=0.9)
    if name == "lars":
        try:
            from densessl.train.lars import LARS
        except ImportError as exc:
            raise ConfigError(f"train.optimizer: 'lars' needs densessl.train.lars.LARS, which cannot be imported "
                              f"({exc}); use 'adamw' or 'sgd', or install a densessl version that has it") from exc
        return LARS(groups)
    raise ConfigError(f"train.optimizer: {name!r} is not supported; use one of {list(OPTIMIZERS)}")
