"""What every pretraining method provides to the shared trainer."""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from densessl.errors import ConfigError

METHODS: dict[str, type[PretrainMethod]] = {}


def register(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[PretrainMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name]


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def type_matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a dataclass field's annotation (int for float is fine; bool is not an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(type_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(type_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # another typing construct: left to the dataclass


def _type_error(where: str, name: str, value: Any, hint: Any) -> str:
    message = f"{where}.{name}: {value!r} is a {type(value).__name__}, expected {_type_name(hint)}"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string
            message += f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. 1.0e-3)"
    return message


def build_dataclass(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Instantiate a config dataclass, rejecting unknown keys (naming them and the valid ones) and values of the
    wrong type (naming the field, the value and the type), so a config error surfaces when the configuration
    is loaded (``snakemake -n``), not hours into a job."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    wrong = [_type_error(where, n, values[n], hints[n]) for n in sorted(values) if not type_matches(values[n], hints[n])]
    if wrong:
        raise ConfigError("; ".join(wrong))
    for f in dataclasses.fields(cls):  # YAML gives lists where the dataclass wants tuples
        if f.name in values and isinstance(values[f.name], list) and "tuple" in str(f.type):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


class PretrainMethod(nn.Module, metaclass=abc.ABCMeta):
    """Student, teacher and loss of one method.

    The trainer owns the loop (optimiser, schedules, checkpoints, DDP); a method owns what one step computes,
    how views are made and which backbone is exported. ``student`` is the module the optimiser updates.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]

    student: nn.Module
    teacher: nn.Module | None

    # Optional hooks read by the trainer. A method may also define ``param_groups()`` (its own optimiser
    # groups, e.g. LARS exclusions); it is deliberately not defined here, so "defined" means "the method's own".
    optimizer_name: ClassVar[str | None] = None     # optimiser when train.optimizer is null (None → adamw)
    find_unused_parameters: ClassVar[bool] = False  # DDP: some student parameters get no gradient on some steps
    sync_batchnorm: ClassVar[bool | None] = None    # None: SyncBatchNorm under CUDA DDP when the method has BN
    # What the pretraining dataset yields with each image: None (images only), "image" ((image, class index)
    # pairs) or "patch" ((image, label map) pairs). The supervised reference sets it from its target.
    labels: str | None = None

    @abc.abstractmethod
    def views(self) -> Callable[[Any], Any]:
        """The view generator applied to each raw image (runs in DataLoader workers)."""

    @abc.abstractmethod
    def loss(self, batch: Any, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Scalar loss of one batch plus values to log: floats or 0-dim tensors. Prefer tensors for anything
        computed on the device: the trainer reads them back only at log steps, while ``float()`` here would
        make every step wait for the GPU."""

    def update_teacher(self, momentum: float) -> None:
        """EMA teacher update θ_t ← m θ_t + (1 − m) θ_s (no-op for methods without a teacher)."""

    def cancel_gradients(self, epoch: int) -> None:
        """Drop gradients of parameters frozen at this epoch (e.g. DINO's last layer in epoch 0)."""

    @abc.abstractmethod
    def export_backbone(self) -> nn.Module:
        """The backbone evaluated downstream (the teacher where the paper evaluates the teacher)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state that must survive resume (e.g. DINO's centre)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass
