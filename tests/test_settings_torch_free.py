"""The settings check of ``snakemake -n`` builds every config dataclass without importing torch (or torchvision,
timm, mmcv), and the torch-free tables name the same classes the methods and the evaluate stage use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from densessl.config import EVALUATIONS, load_config
from densessl.errors import ConfigError
from densessl.evaluate.protocol_configs import protocol_config_class
from densessl.methods.configs import METHOD_CONFIGS, method_config_class

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "mmcv", "mmengine", "mmdet", "mmseg")

_CHECK = """
import json, sys
from pathlib import Path
from densessl.config import load_config
from densessl.settings_check import check_stage_settings
for preset in ("smoke", "paper"):
    check_stage_settings(load_config([Path("config.yaml")], preset=preset, root=Path("."), check_settings=False))
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def test_the_settings_check_leaves_torch_unimported() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _CHECK.format(heavy=HEAVY)], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_method_configs_are_the_registered_methods_config_classes() -> None:
    from densessl.methods import METHODS

    assert sorted(METHOD_CONFIGS) == sorted(METHODS)
    for name, method in METHODS.items():
        assert method_config_class(name) is method.config_cls, name
    with pytest.raises(ConfigError, match="unknown method 'byol'"):
        method_config_class("byol")


def test_protocol_configs_are_the_evaluate_stage_classes() -> None:
    from densessl.stages.evaluate import DETECTION_PROTOCOLS, _protocol

    for protocol in EVALUATIONS:
        if protocol in DETECTION_PROTOCOLS:
            from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig

            assert protocol_config_class(protocol) is DetectionConfig
        else:
            assert _protocol(protocol)[0] is protocol_config_class(protocol), protocol
    with pytest.raises(ConfigError, match="unknown evaluation 'nope'"):
        protocol_config_class("nope")


def test_a_bad_method_field_is_still_refused(tmp_path: Path) -> None:
    from densessl.settings_check import check_stage_settings

    path = tmp_path / "config.yaml"
    path.write_text("preset: smoke\npretrain:\n  dino:\n    method:\n      out_dimm: 8\n", encoding="utf-8")
    cfg = load_config([path], root=REPO, check_settings=False)
    with pytest.raises(ConfigError, match=r"pretrain.dino.method: unknown field\(s\) \['out_dimm'\]"):
        check_stage_settings(cfg)
