"""Check every stage's settings when the configuration is loaded, before any job runs.

The JSON schema checks the shape of config.yaml; the settings inside ``pretrain.<method>.method``,
``pretrain.<method>.train`` and ``evaluate.<protocol>`` are the fields of dataclasses (each method's config,
``TrainConfig``, each protocol's config), checked here with :func:`densessl.methods.base.build_dataclass` —
unknown keys and wrong types — exactly as the stages build them. The Snakefile loads the configuration through
``densessl.config.load_config``, so ``snakemake -n`` reports such errors instead of a job failing later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from densessl.config import Config


def check_stage_settings(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the field if a run's or protocol's settings would not build."""
    from densessl.config import EVALUATIONS
    from densessl.launch.resources import compute_plan
    from densessl.methods import get_method
    from densessl.methods.base import build_dataclass

    # the protocol → config class mapping of the evaluate stage, so both build the same dataclass
    from densessl.stages.evaluate import _protocol_settings, protocol_config_class
    from densessl.train.trainer import TrainConfig

    for run in cfg.pretrain_runs:
        settings = cfg.pretrain_settings(run)
        build_dataclass(TrainConfig, settings["train"], f"pretrain.{run.method}.train")
        compute_plan(cfg, run)  # the GPU-count rule and the slurm block, before any job is submitted
        method_cls = get_method(run.method)
        build_dataclass(method_cls.config_cls, settings["method"], f"pretrain.{run.method}.method")
    for protocol in cfg.evaluations:
        config_cls = protocol_config_class(protocol)
        settings = _protocol_settings(cfg, protocol)  # with the fields the protocol's name fixes
        build_dataclass(config_cls, settings, f"evaluate.{EVALUATIONS[protocol]['settings']}")
