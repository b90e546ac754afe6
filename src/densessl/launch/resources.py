"""One pretraining run's compute plan: its GPU layout, batch plan, time plan and the Snakemake resources that ask
SLURM for them (workflow/rules/pretrain.smk reads ``pretrain_resources``; ``snakemake -n`` prints them per job).

Layout: ``pretrain.<method>.train.nodes`` × ``nproc_per_node`` (GPUs per node; the presets give each paper's
count). When ``slurm.gpus_per_node`` (the site's node size) is smaller, the same number of GPUs is spread over
more nodes, so the recipe runs unchanged. Any layout is then checked by the GPU-count rule (``batch_rule``).

How a job runs on SLURM (snakemake-executor-plugin-slurm):

* one process: the plugin's own ``srun -n1`` step; ``gpu: 1`` at paper scale.
* several processes: ``mpi`` is set, so the plugin starts no step of its own and the stage starts one task per
  GPU with ``srun`` over the whole allocation (``densessl.launch.srun``); the job asks for ``--nodes``,
  ``--ntasks`` and ``--ntasks-per-node`` (and ``--gpus-per-node`` at paper scale).
* always ``--signal=TERM@<slurm.signal_seconds>``: the run checkpoints and exits 3 before its limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from densessl.errors import ConfigError
from densessl.launch.batch_rule import BatchPlan, Recipe, plan_batch
from densessl.launch.slurm_site import SlurmSite
from densessl.launch.time_plan import TimePlan, plan_time

if TYPE_CHECKING:
    from densessl.config import Config, Run

FAILURE_RETRIES = 2  # retries of a failed job besides the planned segments (the profile's `retries`)


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int  # processes per node (GPUs at paper scale, CPU processes at smoke scale)
    gpus: bool          # False at smoke scale: the processes run on CPU (gloo)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ComputePlan:
    run: str
    layout: Layout
    batch: BatchPlan
    time: TimePlan
    images: int | None


def site_of(cfg: Config) -> SlurmSite:
    return SlurmSite.from_config(cfg.data.get("slurm"))


def run_layout(cfg: Config, run: Run, nodes: int | None = None, gpus_per_node: int | None = None) -> Layout:
    """The run's nodes × GPUs per node; ``nodes``/``gpus_per_node`` (``launch`` options) replace the config's."""
    train = cfg.pretrain_settings(run)["train"]
    where = f"pretrain.{run.method}.train"
    n = nodes if nodes is not None else train.get("nodes", 1)
    g = gpus_per_node if gpus_per_node is not None else (train.get("nproc_per_node") or 1)
    for name, value in (("nodes", n), ("nproc_per_node", g)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{name}: {value!r}; expected an integer ≥ 1")
    site = site_of(cfg)
    if gpus_per_node is None and site.gpus_per_node is not None and g > site.gpus_per_node:
        world = n * g
        if world % site.gpus_per_node:
            raise ConfigError(f"{where}: {world} GPUs do not fill nodes of slurm.gpus_per_node={site.gpus_per_node}; "
                              f"set {where}.nodes and nproc_per_node to a layout of whole nodes")
        n, g = world // site.gpus_per_node, site.gpus_per_node
    return Layout(n, g, gpus=cfg.preset != "smoke")


@cache
def published_train_count(dataset: str) -> int | None:
    """The training images of ``dataset`` as published (data/catalog.yaml ``counts``, split train)."""
    from densessl.data.catalog import load_catalog

    spec = load_catalog().get(dataset)
    counts = [c.expected for c in spec.counts if c.split == "train"] if spec else []
    return counts[0] if counts else None


def train_images(cfg: Config, run: Run) -> int | None:
    """Images per epoch: the dataset's published training count, capped by max_train_images."""
    cap = cfg.pretrain_settings(run)["train"].get("max_train_images")
    if cfg.data.get("data", {}).get("synthetic"):
        return cap
    known = [x for x in (published_train_count(run.data), cap) if x is not None]
    return min(known) if known else None


def compute_plan(cfg: Config, run: Run, nodes: int | None = None, gpus_per_node: int | None = None) -> ComputePlan:
    """Layout, batch plan (refused counts raise ``GpuCountError``) and time plan of one pretraining run."""
    layout = run_layout(cfg, run, nodes, gpus_per_node)
    train = cfg.pretrain_settings(run)["train"]
    batch = plan_batch(Recipe.from_train(run.method, train), layout.nodes, layout.gpus_per_node)
    images = train_images(cfg, run)
    if images is None or not layout.gpus:
        time = TimePlan(None, 1, None, None, "smoke scale: the profile's runtime")
    else:
        time = plan_time(run.method, run.arch, images, int(train.get("epochs", 100)), layout.world, site_of(cfg))
    return ComputePlan(run.id, layout, batch, time, images)


def slurm_resources(plan: ComputePlan, site: SlurmSite, threads: int) -> dict[str, Any]:
    """The Snakemake resources of the run's job(s); None values are left unset (the profile's defaults apply)."""
    layout = plan.layout
    per_task_cpus = site.cpus_per_gpu if layout.gpus else threads
    extra = [f"--signal=TERM@{site.signal_seconds}"]
    resources: dict[str, Any] = {
        "gpus": layout.world if layout.gpus else 0,
        "nodes": layout.nodes,
        "runtime": plan.time.runtime,
        "cpus_per_task": per_task_cpus,
        "mem_mb": site.mem_mb_per_gpu * layout.gpus_per_node if layout.gpus else None,
        "segments": plan.time.segments,
        "mpi": None, "tasks": None, "gpu": None,
    }
    if layout.world > 1:
        resources.update(mpi="srun", tasks=layout.world)
        extra.insert(0, f"--ntasks-per-node={layout.gpus_per_node}")
        if layout.gpus:
            extra.insert(1, f"--gpus-per-node={layout.gpus_per_node}")
    elif layout.gpus:
        resources["gpu"] = 1
    resources["slurm_extra"] = " ".join(extra)
    resources.update(site.sbatch_site_resources())
    return resources


RESOURCE_KEYS = ("gpus", "gpu", "nodes", "tasks", "mpi", "runtime", "cpus_per_task", "mem_mb", "segments",
                 "slurm_extra", "slurm_partition", "slurm_account", "qos")
# keys whose absence a job may need although other jobs of the rule set them (no default to fall back to)
PER_JOB_KEYS = frozenset({"gpu", "tasks", "mpi"})
# a run without a throughput figure among runs with one: a resource a rule sets but returns None for is unset
# (Snakemake drops the default too), so such a run asks for the partition's limit, or this long without one
RUNTIME_WITHOUT_FIGURE = 4320


def pretrain_resources(cfg: Config, run_id: str) -> dict[str, Any]:
    """``slurm_resources`` of one run, computed once per run and configuration (the Snakefile asks once per
    resource key and job)."""
    cache: dict[str, dict[str, Any]] = cfg.__dict__.setdefault("_pretrain_resources", {})
    if run_id not in cache:
        cache[run_id] = slurm_resources(compute_plan(cfg, cfg.run(run_id)), site_of(cfg), cfg.threads)
    return cache[run_id]


def pretrain_resource_keys(cfg: Config) -> list[str]:
    """The resources the pretrain rule sets: a key no run sets is left out, so the profile's default applies
    (Snakemake drops a default when a rule's function returns None for it)."""
    plans = [pretrain_resources(cfg, r.id) for r in cfg.pretrain_runs]
    return [k for k in RESOURCE_KEYS if k in PER_JOB_KEYS or any(p.get(k) is not None for p in plans)]


def pretrain_resource(cfg: Config, run_id: str, key: str) -> Any:
    """One resource of one run's job, for the Snakefile (see ``pretrain_resource_keys``)."""
    value = pretrain_resources(cfg, run_id).get(key)
    if value is None and key == "runtime":
        return site_of(cfg).max_time or RUNTIME_WITHOUT_FIGURE
    return value


def pretrain_retries(cfg: Config) -> int:
    """Retries of the pretrain rule: the failure retries plus the planned segments of the longest run."""
    segments = [pretrain_resources(cfg, r.id)["segments"] for r in cfg.pretrain_runs]
    return FAILURE_RETRIES + max([s - 1 for s in segments], default=0)


def describe(plan: ComputePlan) -> str:
    """One line per run, printed by ``launch --dry-run``."""
    b, t = plan.batch, plan.time
    limit = f"{t.runtime} min" if t.runtime is not None else "profile default"
    split = f" in {t.segments} segments" if t.segments > 1 else ""
    return (f"{plan.run}: {plan.layout.nodes} node(s) × {plan.layout.gpus_per_node} "
            f"{'GPU(s)' if plan.layout.gpus else 'CPU process(es)'}; batch {b.batch_size} = per-GPU "
            f"{b.batch_size_per_gpu} × {b.world} × accumulation {b.accumulation_steps}; peak lr {b.lr:g}; "
            f"time limit {limit}{split}" + (f" (estimate {math.ceil(t.estimate)} min)" if t.estimate else ""))
