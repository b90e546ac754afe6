"""Atomic file outputs: a stage either leaves a complete file or none, so an interrupted run never leaves a
half-written artifact that Snakemake or DVC would take for finished."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def _create_private_temp(path: Path, suffix: str) -> Path:
    """A new empty file next to ``path`` created with mode 0o666 filtered by the user's umask.

    ``tempfile.mkstemp`` always creates 0600, unreadable to the rest of a cluster group; ``os.open`` with
    0o666 gives what any other program would (0644 under umask 022, 0664 under 002)."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(path.parent))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file is removed whatever goes wrong (an exception, a full disk, a signal that raises), so a
    failed write leaves neither a torn output nor a stray ``.name.xxxx`` file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_private_temp(path, suffix or path.suffix or ".tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def torch_save_to(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through a Python file object, synced to disk; a failing write raises its ``OSError``.

    Given a path, torch's C++ writer reports a full disk as "enforce fail ... unexpected pos"; through a file
    object the write raises ``OSError(ENOSPC)``, but torch's zip writer then fails again while closing and
    raises that RuntimeError instead, with the ``OSError`` as its context: this re-raises the ``OSError``,
    which names the errno and which the CLI turns into one line with the file name."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as exc:
        context = exc.__context__
        if isinstance(context, OSError):
            if context.filename is None:
                context.filename = os.fspath(path)
            raise context from None
        raise
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically (:func:`torch_save_to` into a temporary file renamed onto ``path``)."""
    with atomic_path(path) as tmp:
        torch_save_to(obj, tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_safe(obj: Any) -> Any:
    """NaN/inf → None, so every JSON file we write is strict JSON (metrics can be NaN, e.g. an empty class)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    write_text(path, text + "\n")


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | os.PathLike[str]) -> Any:
    from densessl.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a JSON file written by an earlier stage)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage that writes it") from exc


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
