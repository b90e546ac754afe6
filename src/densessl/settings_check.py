"""Check every stage's settings when the configuration is loaded, before any job runs.

The JSON schema checks the shape of config.yaml; the settings inside ``pretrain.<method>.method``,
``pretrain.<method>.train`` and ``evaluate.<protocol>`` are the fields of dataclasses (each method's config,
``TrainConfig``, each protocol's config), checked here with :func:`densessl.config_dataclass.build_dataclass` —
unknown keys and wrong types — exactly as the stages build them. The Snakefile loads the configuration through
``densessl.config.load_config``, so ``snakemake -n`` reports such errors instead of a job failing later.

Those dataclasses live in modules of their own (``densessl.methods.<name>_config``, listed by name in
``densessl.methods.configs``; ``densessl.train.train_config``; the protocols' ``*_config`` modules, listed in
``densessl.evaluate.protocol_configs``) that import neither torch, torchvision, timm nor mmcv, which would
cost more CPU time than the rest of ``snakemake -n``. The check depends only on the merged configuration and on
densessl's own source, so a passed check is remembered under a hash of both in ``<results>/.settings-check.json``
and not repeated until either changes (a SLURM job re-reads the Snakefile, so every job would otherwise pay it
again).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from densessl.config import Config

CACHE_NAME = ".settings-check.json"
CACHE_KEYS_KEPT = 16  # a few config variants (overrides, extra --configfile) side by side without re-checking
PACKAGE_DIR = Path(__file__).resolve().parent


def source_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over densessl's .py and .yaml files (relative path and bytes): the code the check runs."""
    digest = hashlib.sha256()
    for f in sorted(package_dir.rglob("*")):
        if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts and f.is_file():
            digest.update(f.relative_to(package_dir).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def check_key(cfg: Config) -> str:
    """What a passed check is valid for: the merged configuration, densessl's source and the Python version."""
    payload = {"config": cfg.data, "source": source_digest(), "python": sys.version_info[:2]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _cached_keys(path: Path) -> list[str]:
    try:
        keys = json.loads(path.read_text()).get("passed", [])
    except (OSError, ValueError, AttributeError):
        return []  # absent, unreadable or not ours: check again
    return [k for k in keys if isinstance(k, str)]


def check_stage_settings_cached(cfg: Config, cache_dir: Path | None = None) -> bool:
    """:func:`check_stage_settings` unless the same configuration and code passed before; True when it ran.

    The cache is only ever an optimisation: a results folder that cannot be written (read-only, another user's)
    means the check runs every time, never that it is skipped."""
    path = (cache_dir if cache_dir is not None else cfg.results) / CACHE_NAME
    key = check_key(cfg)
    keys = _cached_keys(path)
    if key in keys:
        return False
    check_stage_settings(cfg)
    from densessl.io import write_json

    record: dict[str, Any] = {"passed": ([key] + [k for k in keys if k != key])[:CACHE_KEYS_KEPT],
                              "what": "hashes of configurations whose stage settings passed "
                                      "densessl.settings_check; delete this file to check again"}
    try:
        write_json(path, record)
    except OSError:
        pass
    return True


def check_stage_settings(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the field if a run's or protocol's settings would not build."""
    from densessl.config import EVALUATIONS
    from densessl.config_dataclass import build_dataclass

    # the protocol → config class mapping of the evaluate stage, so both build the same dataclass
    from densessl.evaluate.protocol_configs import protocol_config_class, protocol_settings
    from densessl.launch.resources import compute_plan
    from densessl.methods.configs import method_config_class
    from densessl.train.train_config import TrainConfig

    for run in cfg.pretrain_runs:
        settings = cfg.pretrain_settings(run)
        build_dataclass(TrainConfig, settings["train"], f"pretrain.{run.method}.train")
        compute_plan(cfg, run)  # the GPU-count rule and the slurm block, before any job is submitted
        build_dataclass(method_config_class(run.method), settings["method"], f"pretrain.{run.method}.method")
    for protocol in cfg.evaluations:
        config_cls = protocol_config_class(protocol)
        settings = protocol_settings(cfg, protocol)  # with the fields the protocol's name fixes
        build_dataclass(config_cls, settings, f"evaluate.{EVALUATIONS[protocol]['settings']}")
