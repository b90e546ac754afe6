"""Evaluation protocol names, including the Patch-Seg grid points.

The Patch-Seg benchmark is a grid: 3 label reductions x 3 heads, plus the two intervention heads with union
labels, x 2 datasets (iancovert/patch-seg @ fc14f36 ``scripts/train.py``: ``--label-reduction``,
``--output-head``, ``--dataset``; ``prepare_output_head`` asserts union for ``transformer-cls`` and
``transformer-separate``). Each grid point is its own DAG job with its own results folder, named
``<base>.<reduction>-<head>``, e.g. ``patchseg_coco.majority-mlp``, ``patchseg_coco.union-transformer-cls`` or
``patchseg_ade20k.global-union-transformer``; ``<base>`` is ``patchseg_coco``, ``patchseg_coco_things`` (the
``things`` class set) or ``patchseg_ade20k``. The plain base names keep meaning the point the ``patchseg``
settings block selects (by default the official union + transformer). A grid point's name fixes its reduction
and head: they override the settings block, so the report's rows and folders always say what was run. A name
pairing an intervention head with another reduction parses, so that the settings check refuses it with the
reason (``PatchSegConfig``) instead of calling it an unknown protocol.
"""

from __future__ import annotations

import copy
import re
from typing import Any

PATCHSEG_REDUCTIONS = ("union", "majority", "global-union")
PATCHSEG_HEADS = ("linear", "mlp", "transformer", "transformer-cls", "transformer-separate")
PATCHSEG_UNION_ONLY_HEADS = ("transformer-cls", "transformer-separate")
PATCHSEG_BASES = ("patchseg_coco", "patchseg_coco_things", "patchseg_ade20k")
PATCHSEG_VARIANT = re.compile(r"^(?P<base>{})\.(?P<reduction>{})-(?P<head>{})$".format(
    "|".join(PATCHSEG_BASES), "|".join(map(re.escape, PATCHSEG_REDUCTIONS)), "|".join(PATCHSEG_HEADS)))


def patchseg_grid(base: str) -> list[str]:
    """Every grid point of one Patch-Seg base protocol: 3 reductions x 3 heads, then the 2 union-only heads
    (11 names)."""
    return [f"{base}.{r}-{h}" for r in PATCHSEG_REDUCTIONS for h in PATCHSEG_HEADS
            if h not in PATCHSEG_UNION_ONLY_HEADS or r == "union"]


class ProtocolRegistry(dict[str, dict[str, Any]]):
    """Protocol name -> facts (dataset, settings block, title, ...). Iterating lists the base protocols; a
    Patch-Seg grid point is looked up too, as its base's facts with ``fixed`` (settings the name fixes),
    ``base`` and a title that names the reduction and head."""

    def variant(self, name: str) -> dict[str, Any] | None:
        match = PATCHSEG_VARIANT.match(name)
        if match is None or not super().__contains__(match["base"]):
            return None
        entry = copy.deepcopy(super().__getitem__(match["base"]))
        entry["base"] = match["base"]
        entry["fixed"] = {**entry.get("fixed", {}), "label_reduction": match["reduction"], "head": match["head"]}
        entry["title"] = f"{entry['title']}: {match['reduction']} labels, {match['head']} head"
        return entry

    def __missing__(self, name: str) -> dict[str, Any]:
        entry = self.variant(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and self.variant(name) is not None)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self else default


def protocol_base(name: str) -> str:
    """The base protocol of a name (itself unless it is a Patch-Seg grid point)."""
    match = PATCHSEG_VARIANT.match(name)
    return match["base"] if match else name
