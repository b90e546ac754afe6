"""``python -m densessl export --format FORMAT --run RUN --out FILE``: a run's exported backbone in another
toolkit's weight layout, for users who run that toolkit themselves (outside the DAG)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from densessl.checkpoints.io import load_backbone
from densessl.config import Config
from densessl.errors import CheckpointError


def _detectron2(model: nn.Module, out: Path) -> Path:
    from densessl.checkpoints.detectron2 import write_detectron2

    return write_detectron2(model, out)


# format name -> writer(backbone, out path)
FORMATS: dict[str, Callable[[nn.Module, Path], Path]] = {"detectron2": _detectron2}


def run_export(cfg: Config, fmt: str, run_id: str, out: Path) -> Path:
    if fmt not in FORMATS:
        raise CheckpointError(f"export --format {fmt!r}: unknown; choose one of {sorted(FORMATS)}")
    run = cfg.run(run_id)
    path = cfg.backbone(run)
    if not path.is_file():
        raise CheckpointError(f"{path}: no exported backbone for {run.id}; run `python -m densessl convert --run "
                              f"{run.id}` (or the DAG) first")
    model, _meta = load_backbone(path)
    return FORMATS[fmt](model, Path(out))
