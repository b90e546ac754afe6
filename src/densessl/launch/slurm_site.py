"""The site's SLURM settings: config.yaml's ``slurm:`` block, each field overridable by an environment variable.

Precedence, highest first: ``DENSESSL_SLURM_<FIELD>`` in the environment, ``slurm.<field>`` in config.yaml (or
another ``--configfile``), the profile's ``default-resources`` (workflow/profiles/slurm/config.v8+.yaml:
``slurm_partition``, ``slurm_account``, ``qos``). An unset partition, account or QoS is left to the profile, so
editing the profile alone keeps working; ``snakemake --set-resources`` still overrides everything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from densessl.errors import ConfigError

ENV_PREFIX = "DENSESSL_SLURM_"


def parse_minutes(value: Any, where: str) -> int:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) or an integer
    number of minutes → whole minutes (seconds rounded up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        minutes = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if not match:
            raise ConfigError(f"{where}: {value!r} is not a SLURM time; write minutes (4320) or D-HH:MM:SS "
                              f"(3-00:00:00) or HH:MM:SS (72:00:00)")
        days, a, b, c = match.groups()
        parts = [int(x) for x in (a, b, c) if x is not None]
        if days is not None:  # D-HH[:MM[:SS]]
            hours, mins, secs = (parts + [0, 0])[:3]
            minutes = int(days) * 1440 + hours * 60 + mins + (1 if secs else 0)
        elif len(parts) == 2:  # MM:SS
            minutes = parts[0] + (1 if parts[1] else 0)
        else:  # HH:MM:SS
            minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    else:
        raise ConfigError(f"{where}: {value!r}; expected minutes or a SLURM time such as 3-00:00:00")
    if minutes < 1:
        raise ConfigError(f"{where}: {value!r} is under a minute")
    return minutes


@dataclass(frozen=True)
class SlurmSite:
    """What differs between clusters. Every field: ``slurm.<field>`` or ``DENSESSL_SLURM_<FIELD>``."""

    partition: str | None = None      # sbatch --partition; unset: the profile's slurm_partition
    account: str | None = None        # sbatch --account; unset: the profile's (or none)
    qos: str | None = None            # sbatch --qos; unset: the profile's (or none)
    max_time: int | None = None       # the partition's time limit in minutes; longer jobs run as segments
    gpus_per_node: int | None = None  # GPUs of one node: a run needing more per node is spread over nodes
    cpus_per_gpu: int = 10            # CPUs per training process (DINO main_dino.py --num_workers 10)
    mem_mb_per_gpu: int = 60000       # host memory per training process
    time_safety_factor: float = 2.0   # × the estimate from the throughput table (time_plan.py)
    signal_seconds: int = 180         # SIGTERM this long before a segment's limit: checkpoint, exit 3
    throughput: dict[str, float] = field(default_factory=dict)  # images/s per GPU by "<method>/<arch>"

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> SlurmSite:
        env = os.environ if env is None else env
        block = dict(block or {})
        unknown = sorted(set(block) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"slurm: unknown field(s) {unknown}; allowed: {[f.name for f in fields(cls)]}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = block.get(f.name)
            var = ENV_PREFIX + f.name.upper()
            if f.name != "throughput" and env.get(var):
                value = env[var]
            if value is None:
                continue
            where = f"{var}" if f.name != "throughput" and env.get(var) else f"slurm.{f.name}"
            values[f.name] = _coerce(f.name, value, where)
        return cls(**values)

    def sbatch_site_resources(self) -> dict[str, str]:
        """The Snakemake resources that override the profile: only the fields that are set."""
        names = {"partition": "slurm_partition", "account": "slurm_account", "qos": "qos"}
        return {names[k]: getattr(self, k) for k in names if getattr(self, k)}


def _coerce(name: str, value: Any, where: str) -> Any:
    if name in ("partition", "account", "qos"):
        return str(value)
    if name == "max_time":
        return parse_minutes(value, where)
    if name == "throughput":
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
            raise ConfigError(f"{where}: expected {{<method>/<arch>: images per second per GPU}}, got {value!r}")
        return {str(k): float(v) for k, v in value.items()}
    try:
        number = float(value) if name == "time_safety_factor" else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if number <= 0:
        raise ConfigError(f"{where}: {value!r}; must be positive")
    return number
