"""Pretraining methods, registered by name. A method = backbone + heads + loss + views; the trainer is shared.

The method modules (torch, timm) load on first use of ``METHODS``, ``PretrainMethod`` or ``get_method``, not on
import of the package: each method's settings dataclass (``densessl.methods.<name>_config``, by name in
``densessl.methods.configs``) then loads without torch, as the settings check of ``snakemake -n`` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from densessl.methods.base import METHODS, PretrainMethod, get_method

METHOD_MODULES = ("clove", "dino", "gtsa", "loca", "selfpatch", "supervised")

__all__ = ["METHODS", "PretrainMethod", "get_method"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in METHOD_MODULES:  # imported for registration side effects
        importlib.import_module(f"{__name__}.{module}")
    base = importlib.import_module(f"{__name__}.base")
    return getattr(base, name)
