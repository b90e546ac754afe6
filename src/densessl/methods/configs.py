"""Method name → its settings dataclass, without importing the methods (torch, timm).

The settings check of ``snakemake -n`` (``densessl.settings_check``) builds each run's ``pretrain.<method>.method``
block from this table; each registered method's ``config_cls`` is the same class (tests/test_settings_torch_free.py).
"""

from __future__ import annotations

from densessl.errors import ConfigError
from densessl.methods.clove_config import CLoVEConfig
from densessl.methods.dino_config import DINOConfig
from densessl.methods.gtsa_config import GTSAConfig
from densessl.methods.loca_config import LOCAConfig
from densessl.methods.selfpatch_config import SelfPatchConfig
from densessl.methods.supervised_config import SupervisedConfig

METHOD_CONFIGS: dict[str, type] = {
    "clove": CLoVEConfig,
    "dino": DINOConfig,
    "gtsa": GTSAConfig,
    "loca": LOCAConfig,
    "selfpatch": SelfPatchConfig,
    "supervised": SupervisedConfig,
}


def method_config_class(name: str) -> type:
    """The settings dataclass of method ``name`` (``get_method(name).config_cls``, without torch)."""
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"unknown method {name!r}; registered methods: {sorted(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[name]
