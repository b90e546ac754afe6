"""Pretraining methods, registered by name. A method = backbone + heads + loss + views; the trainer is shared."""

# Import for registration side effects.
from densessl.methods import clove, dino, gtsa, loca, selfpatch, supervised  # noqa: F401,E402
from densessl.methods.base import METHODS, PretrainMethod, get_method

__all__ = ["METHODS", "PretrainMethod", "get_method"]
