"""Protocol name → its settings dataclass and settings block, without importing the protocols (torch, mmcv).

The evaluate stage (``densessl.stages.evaluate``) and the settings check of ``snakemake -n``
(``densessl.settings_check``) both build a protocol's settings from here, so they build the same dataclass
from the same values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from densessl.config import EVALUATIONS
from densessl.errors import ConfigError
from densessl.evaluate.transfer.mmdet_protocols import PROTOCOLS as MMDET_PROTOCOLS

if TYPE_CHECKING:
    from densessl.config import Config

# mmseg decoder of each mmseg protocol (one settings class, two decoders, as patchseg's two datasets)
MMSEG_DECODER = {"semfpn_ade20k": "semfpn", "upernet_ade20k": "upernet"}


def protocol_config_class(protocol: str) -> type:
    """The settings dataclass of ``protocol`` (imports only the protocol's ``*_config`` module)."""
    if protocol not in EVALUATIONS:
        raise ConfigError(f"unknown evaluation {protocol!r}; choose one of {sorted(EVALUATIONS)} or a Patch-Seg "
                          f"grid point such as patchseg_coco.majority-mlp")
    if protocol in MMDET_PROTOCOLS:
        from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig

        return DetectionConfig
    if EVALUATIONS[protocol]["settings"] == "patchseg":
        from densessl.evaluate.patchseg_config import PatchSegConfig

        return PatchSegConfig
    if protocol == "linear_ade20k":
        from densessl.evaluate.linear_seg_config import LinearSegConfig

        return LinearSegConfig
    if protocol == "davis2017":
        from densessl.evaluate.davis_config import DavisConfig

        return DavisConfig
    if protocol == "inat19_finetune":
        from densessl.evaluate.inat_finetune_config import InatFinetuneConfig

        return InatFinetuneConfig
    if protocol == "knn_imagenet":
        from densessl.evaluate.knn_config import KnnConfig

        return KnnConfig
    if protocol == "linear_imagenet":
        from densessl.evaluate.linear_cls_config import LinearClsConfig

        return LinearClsConfig
    if protocol == "keypointrcnn_r50_fpn_coco":
        from densessl.evaluate.transfer.keypoints_config import KeypointRCNNConfig

        return KeypointRCNNConfig
    if protocol in MMSEG_DECODER:
        from densessl.evaluate.transfer.mmseg_config import MMSegSettings

        return MMSegSettings
    raise ConfigError(f"unknown evaluation {protocol!r}; choose one of {sorted(EVALUATIONS)}")


def protocol_settings(cfg: Config, protocol: str) -> dict[str, Any]:
    """The protocol's settings block plus the fields its name fixes (Patch-Seg's dataset, the mmseg decoder)."""
    settings = cfg.eval_settings(protocol)
    settings.update(EVALUATIONS[protocol].get("fixed", {}))  # one patchseg block: the name fixes dataset, grid point
    if protocol in MMSEG_DECODER:
        settings["decoder"] = MMSEG_DECODER[protocol]
    return settings
