"""Provenance recorded with every artifact: code version, configuration, data, software and hardware."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("densessl", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "pycocotools",
            "snakemake", "dvc")


def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    """Commit of the densessl checkout that runs (not of the working directory, which may be elsewhere)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def code_fingerprint(package_dir: Path | None = None) -> dict[str, Any]:
    """SHA-256 over the densessl package's source files (relative path and bytes, sorted), and whether any of
    them differs from the checked-out commit.

    Why not the commit alone: a commit that only edits the README or a test changes HEAD but no number, and
    the report would call every earlier result stale; an edit to the package changes the fingerprint even
    before it is committed, so results made by different code are told apart either way.
    """
    root = package_dir or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in (".py", ".yaml")
                   and "__pycache__" not in f.parts)
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "."], cwd=root,
                                 capture_output=True, text=True, check=True, timeout=10).stdout
        uncommitted: bool | None = any(line[3:].endswith((".py", ".yaml")) for line in changed.splitlines())
    except (OSError, subprocess.SubprocessError):
        uncommitted = None
    return {"sha256": digest.hexdigest(), "files": len(files), "uncommitted": uncommitted}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def collect(stage: str, config_hash: str, inputs: dict[str, Any] | None = None,
            started: float | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "git": git_commit(),
        "code": code_fingerprint(),
        "config_hash": config_hash,
        "inputs": inputs or {},
        "packages": package_versions(),
        "hardware": hardware(),
        "wall_s": None if started is None else round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
