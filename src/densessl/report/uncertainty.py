"""Standard errors of margins, where the protocol's metric is a mean over items both rows were scored on.

Why: a margin over the best random-init seed says "beats" at +0.01 as readily as at +10; on a small
evaluation set that can be noise (the smoke DAVIS set of 4 clips gave DINO +1.7 J&F, which 48 clips showed
to be −0.3 ± 0.4). DAVIS J&F is the mean over objects of per-object scores, so the margin is the mean of
paired per-object differences and its standard error is their sample standard deviation over √n. Patch-Seg
(macro recall over classes) and mIoU (dataset totals) are not means of per-item scores; they get no ± here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# (per-object J, per-object F) → the reported metric in percent, as stages/evaluate.py reports DAVIS
_DAVIS_ITEM: dict[str, Callable[[dict[str, float]], float]] = {
    "JF_mean": lambda o: 50.0 * (o["J-Mean"] + o["F-Mean"]),
    "J_mean": lambda o: 100.0 * o["J-Mean"],
    "F_mean": lambda o: 100.0 * o["F-Mean"],
}


def per_item_scores(protocol: str, metrics: dict[str, Any], metric: str) -> dict[str, float] | None:
    """Item → score whose mean is ``metric``, or None where the protocol's metric is not such a mean."""
    if protocol == "davis2017" and metric in _DAVIS_ITEM and isinstance(metrics.get("per_object"), dict):
        return {name: _DAVIS_ITEM[metric](obj) for name, obj in metrics["per_object"].items()}
    return None


def paired_standard_error(protocol: str, ours: dict[str, Any], baseline: dict[str, Any], metric: str
                          ) -> tuple[float, int] | None:
    """(standard error of mean(ours − baseline) over the items both were scored on, number of items), or None
    when the protocol has no per-item scores, the item sets differ (other data) or fewer than 2 items."""
    a = per_item_scores(protocol, ours, metric)
    b = per_item_scores(protocol, baseline, metric)
    if a is None or b is None or set(a) != set(b) or len(a) < 2:
        return None
    diff = np.array([a[k] - b[k] for k in sorted(a)], dtype=np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return (se, len(diff)) if math.isfinite(se) else None
