"""What every pretraining method provides to the shared trainer."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

# build_dataclass lives in the torch-free densessl.config_dataclass (the settings check of `snakemake -n` uses it)
from densessl.config_dataclass import build_dataclass, type_matches  # noqa: F401  (re-exported)
from densessl.errors import ConfigError

METHODS: dict[str, type[PretrainMethod]] = {}


def register(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[PretrainMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name]


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
