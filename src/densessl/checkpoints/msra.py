"""MSRA's caffe2 ImageNet ResNet-50 (detectron2 ``ImageNetPretrained/MSRA/R-50.pkl``) as a torchvision ResNet-50.

The "Supervised" ResNet-50 rows of the PixPro/CLoVE detection tables fine-tune from this file: the MoCo
detection configs set ``MODEL.WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"``
(facebookresearch/moco @ 3402035 ``detection/configs/coco_R_50_C4_2x.yaml``), which detectron2 resolves to
``https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl``
(facebookresearch/detectron2 @ 1d4edbe ``detectron2/checkpoint/catalog.py``, ``Detectron2ModelCatalog``).
That catalog also states the file's conventions: stride in the 1×1 conv (``STRIDE_IN_1X1=True``), BN fused
into a frozen affine layer, ``PIXEL_STD=[1,1,1]`` (detectron2's defaults: BGR input, 0–255, minus
``PIXEL_MEAN = [103.530, 116.280, 123.675]``, ``detectron2/config/defaults.py``).

What the importer does, and why each step is exact:

- **Reading**: the file is a Python-2 pickle of a dict of numpy arrays (detectron2
  ``DetectionCheckpointer._load_file`` reads it with ``pickle.load(f, encoding="latin1")``, unwraps ``blobs``
  where present and drops ``*_momentum``). Here it is read by :class:`_ArrayUnpickler`, whose ``find_class``
  allows the numpy array reconstruction classes only; any other global in the file is refused before it is
  constructed, so the file never runs code.
- **Names**: caffe2 → torchvision (``conv1_w`` → ``conv1.weight``, ``res_conv1_bn_{s,b}`` → ``bn1.{weight,bias}``,
  ``res{2..5}_{i}_branch2{a,b,c}_w`` → ``layer{1..4}.{i}.conv{1,2,3}.weight``, ``..._branch2x_bn_{s,b}`` →
  ``bn{1,2,3}``, ``..._branch1_w`` / ``_bn_{s,b}`` → ``downsample.0`` / ``downsample.1``), the same renaming as
  detectron2's ``convert_basic_c2_names`` (``detectron2/checkpoint/c2_model_loading.py``); the ImageNet
  classifier ``fc1000_{w,b}`` is dropped, every other array must map, and the load is strict.
- **BatchNorm**: the file stores the affine ``y = s·x + b`` only. It becomes ``weight = s``, ``bias = b``,
  ``running_mean = 0`` and ``running_var = 1 − eps``, so that eval-mode BN computes
  ``(x − 0) / sqrt((1 − eps) + eps) · s + b = s·x + b``.
- **Input convention**, folded into ``conv1``: our pipelines feed RGB normalised by the ImageNet mean/std in
  0–255 units, ``x = (rgb − mean) / std``; MSRA's network reads ``bgr − flip(mean) = flip(std ⊙ x)``. A
  convolution is linear in its input channels, so ``conv1(flip(std ⊙ x); W) = conv1(x; W')`` with
  ``W' = flip_in(W) · std`` (input channels reversed, each multiplied by its std), and zero padding maps to
  zero on both sides: the imported network fed our input equals MSRA's fed its own.
- **Stride**: the network is built caffe style (``create_backbone('resnet50', stride_in_1x1=True)``); the
  flag is stored in the exported backbone's ``arch_kwargs``, so every protocol rebuilds the same network.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from densessl.errors import CheckpointError, ConfigError
from densessl.models.resnet import IMAGENET_STD, create_resnet

# Architecture kwargs of the imported network (stored in the export sidecar).
MSRA_ARCH_KWARGS: dict[str, Any] = {"stride_in_1x1": True}
BN_EPS = 1e-5  # torchvision BatchNorm2d / mmdet BN default eps

# The only globals a pickle of numpy arrays needs (numpy >= 2 names its core `numpy._core`).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_DROP = re.compile(r"^fc1000_[wb]$|_momentum$")
_STAGE = re.compile(r"^res([2-5])_(\d+)_branch(1|2[abc])_(w|bn_s|bn_b)$")
_BRANCH = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"), "1": ("downsample.0", "downsample.1")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that constructs numpy arrays and plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever numpy keeps it
        return getattr(np, name)


def read_caffe2_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a caffe2/Detectron ``.pkl`` (``blobs`` unwrapped, ``*_momentum`` kept for the caller)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; download the official release or fix the path")
    try:
        with path.open("rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused or unreadable pickle ({exc}); a caffe2 .pkl may hold numpy arrays "
                              f"only, nothing else pickled is loaded") from exc
    except Exception as exc:  # noqa: BLE001 - pickle raises EOFError/ValueError/... on a foreign file
        raise CheckpointError(f"{path}: cannot be read as a caffe2 .pkl ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, Mapping) and "blobs" in data:  # Detectron detection models wrap their arrays
        data = data["blobs"]
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{path}: a caffe2 .pkl is a non-empty dict of arrays; found {type(data).__name__}")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not named numpy arrays: {bad[:8]}")
    return dict(data)


def caffe2_to_torchvision(name: str) -> str | None:
    """Our key for the caffe2 blob ``name`` (None: not a ResNet weight)."""
    if name == "conv1_w":
        return "conv1.weight"
    if name in ("res_conv1_bn_s", "res_conv1_bn_b"):
        return "bn1.weight" if name.endswith("_s") else "bn1.bias"
    m = _STAGE.match(name)
    if m is None:
        return None
    stage, block, branch, kind = m.groups()
    conv, bn = _BRANCH[branch]
    prefix = f"layer{int(stage) - 1}.{int(block)}."
    return prefix + {"w": f"{conv}.weight", "bn_s": f"{bn}.weight", "bn_b": f"{bn}.bias"}[kind]


# detectron2 defaults.py PIXEL_MEAN (BGR, 0-255); equal to flip(255 * IMAGENET_MEAN) to the last digit, which is
# what lets the mean drop out of the fold below.
MSRA_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)


def expected_blobs() -> list[str]:
    """The caffe2 names of a ResNet-50 [3, 4, 6, 3] without its classifier (what the importer requires)."""
    names = ["conv1_w", "res_conv1_bn_s", "res_conv1_bn_b"]
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for i in range(blocks):
            for branch in (("1", "2a", "2b", "2c") if i == 0 else ("2a", "2b", "2c")):
                names += [f"res{stage}_{i}_branch{branch}_{kind}" for kind in ("w", "bn_s", "bn_b")]
    return names


def fold_input_convention(conv1: Tensor, std: tuple[float, float, float] = IMAGENET_STD) -> Tensor:
    """conv1 weight for MSRA's BGR255 − mean input → the same conv on RGB normalised by ImageNet mean/std."""
    std255 = torch.tensor([255.0 * s for s in std], dtype=torch.float64).view(1, 3, 1, 1)
    return (conv1.double().flip(1) * std255).to(conv1.dtype)


def msra_state_dict(blobs: Mapping[str, np.ndarray], path: Path) -> dict[str, Tensor]:
    """The caffe2 arrays → a torchvision ResNet-50 state dict (conv1 folded, BN as exact affine)."""
    state: dict[str, Tensor] = {}
    unknown = []
    for name, array in blobs.items():
        if _DROP.search(name):
            continue
        key = caffe2_to_torchvision(name)
        if key is None:
            unknown.append(name)
            continue
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32))
    if unknown:
        raise CheckpointError(f"{path}: blobs that are no part of an MSRA ResNet-50: {sorted(unknown)[:12]}; is "
                              f"this detectron2's ImageNetPretrained/MSRA/R-50.pkl?")
    if "conv1.weight" in state:
        state["conv1.weight"] = fold_input_convention(state["conv1.weight"])
    for key in [k for k in state if re.search(r"(bn\d|downsample\.1)\.weight$", k)]:
        base = key[: -len("weight")]
        n = state[key].numel()
        state[base + "running_mean"] = torch.zeros(n)
        state[base + "running_var"] = torch.full((n,), 1.0 - BN_EPS)
        state[base + "num_batches_tracked"] = torch.tensor(0)
    return state


def import_msra(path: str | Path, arch: str = "resnet50") -> nn.Module:
    """detectron2's ``ImageNetPretrained/MSRA/R-50.pkl`` → caffe-style torchvision ResNet-50 for our inputs."""
    from densessl.checkpoints.importers import RESNET_ARCHS, _load_checked

    path = Path(path)
    if arch not in RESNET_ARCHS:
        raise ConfigError(f"MSRA R-50.pkl holds a ResNet-50; arch must be one of {list(RESNET_ARCHS)}, got {arch!r}")
    state = msra_state_dict(read_caffe2_pickle(path), path)
    model = create_resnet("resnet50", **MSRA_ARCH_KWARGS)
    model.fc = nn.Identity()
    sources = {caffe2_to_torchvision(n): n for n in expected_blobs()}
    return _load_checked(model, state, path, "detectron2_msra", arch, sources={k: v for k, v in sources.items() if k})
