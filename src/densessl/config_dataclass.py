"""Build a config dataclass from YAML values, refusing unknown keys and values of the wrong type.

Every stage builds its settings with :func:`build_dataclass`, and the settings check of ``snakemake -n``
(``densessl.settings_check``) builds the same classes before any job runs. It lives apart from the methods and
protocols, and imports nothing heavier than the standard library, so that check stays free of torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from densessl.errors import ConfigError


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
