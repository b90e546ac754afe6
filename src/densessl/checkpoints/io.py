"""Exported backbones: safetensors weights plus a JSON sidecar (architecture, provenance).

safetensors cannot execute code on load, unlike pickles, so an exported backbone is safe to share; the
sidecar carries everything needed to rebuild the module (``arch`` + ``arch_kwargs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from densessl.errors import CheckpointError
from densessl.io import atomic_path, read_json, write_json
from densessl.models.backbones import create_backbone
from densessl.models.resnet import is_resnet

FORMAT = "densessl-backbone/1"


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_backbone(path: str | Path, model: nn.Module, arch: str, arch_kwargs: dict[str, Any],
                  metadata: dict[str, Any]) -> None:
    """Write ``path`` (safetensors) and its ``.json`` sidecar, each atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if is_resnet(model):  # exported ResNets carry no classifier: dense methods never train `fc`
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # One metadata key: safetensors writes a multi-key metadata map in arbitrary order, which would make
    # identical weights produce different bytes (and different DVC/Snakemake hashes).
    header = {"densessl": json.dumps({"format": FORMAT, "arch": arch, "arch_kwargs": arch_kwargs}, sort_keys=True)}
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp), metadata=header)
        except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
            raise CheckpointError(f"{tmp}: could not write the backbone ({exc}); free space on that disk or "
                                  f"fix its permissions, then re-run") from exc
    write_json(sidecar_path(path), {"format": FORMAT, "arch": arch, "arch_kwargs": arch_kwargs, **metadata})


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone recorded in the sidecar of ``path`` and load its weights strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone checkpoint not found; run the pretrain/export stage first")
    meta = read_json(sidecar_path(path))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar_path(path)}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    model = create_backbone(meta["arch"], **meta["arch_kwargs"])
    if is_resnet(model):
        model.fc = nn.Identity()
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: torn or corrupt backbone file ({exc}); delete it and re-run the convert "
                              f"stage (Snakemake reruns it once the file is gone)") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{path}: weights do not match architecture {meta['arch']!r} "
                              f"(from {sidecar_path(path)}): {str(exc).splitlines()[1:3]}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match architecture {meta['arch']!r}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, meta
