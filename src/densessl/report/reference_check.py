"""The check that each evaluation can see features: the supervised reference beats the best random-init seed of
its network, per protocol.

A self-supervised method's margin over its random init is what its training achieved in its budget, and is
reported as it is. Whether the *evaluation* can tell learned features from random ones is a different question,
answered by a network trained with labels: if the supervised reference does not beat the best random-init seed
of the very network it was drawn as, the protocol (at this scale) cannot show a difference, and no method's
margin on it means anything. The report shows the check; ``python -m densessl check-report`` fails on it (it
runs after ``make smoke``), except on a protocol whose configuration says its budget at this scale lets no
network learn (``baselines.protocols.<protocol>.enforce_reference_check: false``): there the check is shown and
made in a longer override run of the same DAG.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from densessl.config import Config, Run
from densessl.errors import DenseSSLError
from densessl.io import read_json
from densessl.report.uncertainty import paired_standard_error

CHECKS_NAME = "checks.json"
TITLE = "Check: the supervised reference beats the best random-init seed of its network"


@dataclass
class ReferenceCheck:
    protocol: str
    run: str                        # the supervised reference's run id
    metric: str                     # the protocol's headline metric
    reference: float | None
    best_random_init: float | None  # the best seed of the same architecture and variant
    seeds: int
    margin: float | None
    standard_error: float | None    # paired, where the metric is a mean over items
    passed: bool
    enforced: bool = True           # false: shown, but check-report does not fail on it (see the config setting)

    @property
    def verdict(self) -> str:
        if self.reference is None or self.best_random_init is None:
            return "no value" if self.enforced else "no value (not enforced at this scale)"
        if self.passed:
            return "passes"
        return "FAILS" if self.enforced else "fails (not enforced at this scale)"


def _value(values: dict[str, Any], metric: str) -> float | None:
    value = values.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def reference_checks(cfg: Config, protocol: str, rows: list[tuple[Run, dict[str, Any]]], metric: str
                     ) -> list[ReferenceCheck]:
    """One check per supervised reference ``protocol`` evaluated (and that has random-init rows to beat)."""
    out = []
    for run, values in rows:
        if not run.is_supervised:
            continue
        seeds = [v for r, v in rows if r.is_random_init and r.arch == run.arch and r.variant == run.variant]
        scored = [v for v in seeds if _value(v, metric) is not None]
        if not seeds:
            continue
        ours = _value(values, metric)
        best_row = max(scored, key=lambda v: _value(v, metric), default=None)
        best = None if best_row is None else _value(best_row, metric)
        margin = None if ours is None or best is None else ours - best
        se = None if best_row is None else paired_standard_error(protocol, values, best_row, metric)
        out.append(ReferenceCheck(protocol, run.id, metric, ours, best, len(seeds), margin,
                                  None if se is None else se[0], margin is not None and margin > 0,
                                  cfg.reference_check_enforced(protocol)))
    return out


def check_rows(checks: list[ReferenceCheck], label: dict[str, list[str]]) -> list[list[str]]:
    """Table rows: protocol, reference (method, network), its value, best seed, margin, verdict."""
    rows = []
    for c in checks:
        margin = "–" if c.margin is None else f"{c.margin:+.2f}" + (
            "" if c.standard_error is None else f" ± {c.standard_error:.2f}")
        rows.append([f"{c.protocol} {c.metric}", *label[c.run], "–" if c.reference is None else f"{c.reference:.2f}",
                     "–" if c.best_random_init is None else f"{c.best_random_init:.2f} (best of {c.seeds})",
                     margin, c.verdict])
    return rows


CHECK_HEADER = ["protocol", "reference", "network", "value", "best random-init seed", "margin", "check"]


def checks_json(checks: list[ReferenceCheck]) -> list[dict[str, Any]]:
    return [{**asdict(c), "verdict": c.verdict} for c in checks]


def report_failures(cfg: Config) -> tuple[list[str], Path]:
    """(one line per failed or unscored check of the built report, the checks file); no lines = all pass. A
    configuration with a supervised reference that made no check at all fails too: nothing was shown."""
    path = cfg.report_dir / CHECKS_NAME
    if not path.is_file():
        raise DenseSSLError(f"{path}: no report checks; build the report first (python -m densessl report, or "
                            f"make smoke)")
    checks = read_json(path)
    failures = [f"{c['protocol']}: {c['run']} {c['metric']} {c['reference']} vs best random-init seed "
                f"{c['best_random_init']}: {c['verdict']}" for c in checks
                if not c["passed"] and cfg.reference_check_enforced(c["protocol"])]
    if cfg.supervised_runs and not checks:
        failures.append(f"{path}: no supervised-reference check was made; evaluate baselines.supervised_reference "
                        f"and random-init seeds of its network on some protocol")
    return failures, path
