"""Provenance recorded with every artifact: code version, configuration, data, software and hardware."""

from __future__ import annotations

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
        "config_hash": config_hash,
        "inputs": inputs or {},
        "packages": package_versions(),
        "hardware": hardware(),
        "wall_s": None if started is None else round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
