"""Time limits of pretraining jobs from measured throughput, split into segments at the partition's limit.

estimate = images × epochs / (images/s per GPU × GPUs) × ``slurm.time_safety_factor``, plus a start-up
allowance per job. The throughput table holds this project's measured figures with their command; a site measures
its own GPUs with the same command and puts the figures in ``slurm.throughput``. A run with no figure (the smoke
networks) asks for the profile's default ``runtime``.

Segments: above ``slurm.max_time`` a run is submitted as ``ceil(estimate / usable)`` jobs of ``max_time`` each
(``usable`` = the limit less the start-up allowance and the warning signal's lead). SLURM sends SIGTERM
``slurm.signal_seconds`` before each limit; the trainer finishes its step, checkpoints and exits 3, and the
next segment resumes from that checkpoint (the same path as any other interruption, docs/operations.md).

Pure Python, no torch: evaluated for every job of ``snakemake -n``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from densessl.errors import ConfigError
from densessl.launch.slurm_site import SlurmSite

STARTUP_MINUTES = 10  # environment import, data index, first batches, checkpoint load: allowance per job


@dataclass(frozen=True)
class Throughput:
    images_per_s: float  # per GPU, training step at per-GPU batch 64, bf16
    source: str


_MEASURED = ("docs/performance.md, `python benchmarks/train_step.py --scale paper --batch 64` on one H100 80GB "
             "(bf16 autocast, the batch already on the GPU: data loading not included)")

THROUGHPUT: dict[str, Throughput] = {
    "dino/vit-s16": Throughput(563, _MEASURED),
    "selfpatch/vit-s16": Throughput(407, _MEASURED),
    "loca/vit-s16": Throughput(463, _MEASURED),
    "gtsa/vit-s16": Throughput(353, _MEASURED),
    "clove/resnet50": Throughput(360, _MEASURED),
    "dino/vit-b16": Throughput(439, _MEASURED),
    "loca/vit-b16": Throughput(385, _MEASURED),
}


@dataclass(frozen=True)
class TimePlan:
    runtime: int | None     # minutes each job asks for (sbatch -t); None: the profile's default
    segments: int           # jobs the run is split into (1: no split)
    estimate: float | None  # minutes of training, safety factor included
    images_per_s: float | None
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def throughput(method: str, arch: str, site: SlurmSite) -> Throughput | None:
    key = f"{method}/{arch}"
    if key in site.throughput:
        return Throughput(site.throughput[key], "slurm.throughput in the configuration")
    return THROUGHPUT.get(key)


def plan_time(method: str, arch: str, images: int, epochs: int, gpus: int, site: SlurmSite) -> TimePlan:
    """Each job's time limit and the number of segments of one pretraining run on ``gpus`` GPUs."""
    figure = throughput(method, arch, site)
    if figure is None:
        return TimePlan(None, 1, None, None, f"no throughput figure for {method}/{arch}: the profile's runtime")
    training = images * epochs / (figure.images_per_s * max(gpus, 1)) / 60.0 * site.time_safety_factor
    whole = math.ceil(training + STARTUP_MINUTES)
    if site.max_time is None or whole <= site.max_time:
        return TimePlan(whole, 1, training, figure.images_per_s, figure.source)
    usable = site.max_time - STARTUP_MINUTES - math.ceil(site.signal_seconds / 60)
    if usable < 1:
        raise ConfigError(f"slurm.max_time {site.max_time} min leaves no training time after the {STARTUP_MINUTES} "
                         f"min start-up and the {site.signal_seconds} s signal lead")
    return TimePlan(site.max_time, math.ceil(training / usable), training, figure.images_per_s, figure.source)
