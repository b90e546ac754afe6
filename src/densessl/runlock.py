"""One process per run directory.

Two pretrainings (or evaluations) of the same run at once would both train and overwrite each other's
checkpoints. The first process creates ``<dir>/.densessl.lock`` (``O_CREAT | O_EXCL``, which is atomic on
local and NFS v3+ file systems) holding its host and pid; a second one exits at once naming them. A lock left
by a process that died on this host (its pid is gone) is taken over; one from another host cannot be checked
from here, so the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from densessl.errors import DenseSSLError

LOCK_NAME = ".densessl.lock"


class RunLocked(DenseSSLError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # torn by a crash between create and write: treated as stale below


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return True


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold the lock of ``directory`` for the block; raise :class:`RunLocked` naming the holder if another
    live process has it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    host = socket.gethostname()
    record = {"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        if _try_create(path, record):
            break
        holder = _read(path)
        pid = holder.get("pid")
        if holder.get("host") == host and isinstance(pid, int) and _pid_alive(pid) and pid != os.getpid():
            raise RunLocked(f"{path}: this {what} is already running on {host} as pid {pid} (since "
                            f"{holder.get('since', '?')}); wait for it to finish or stop it, then re-run")
        if holder and holder.get("host") != host:
            raise RunLocked(f"{path}: this {what} is held by pid {pid} on host {holder.get('host')} (since "
                            f"{holder.get('since', '?')}); if that process is gone, delete {path} and re-run")
        # stale (dead pid on this host, or unreadable): move it aside atomically so one taker wins the create
        stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(path, stale)
            stale.unlink()
        except FileNotFoundError:
            pass
    else:
        raise RunLocked(f"{path}: could not take the lock (another process keeps taking it); re-run")
    try:
        yield path
    finally:
        if _read(path).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()

