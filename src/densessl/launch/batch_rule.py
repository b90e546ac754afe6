"""The GPU-count rule: any number of GPUs keeps a paper's effective batch, or is refused with the nearest that can.

A recipe fixes the images per optimiser step (``train.batch_size``, the paper's effective batch) and the largest
per-GPU batch known to fit (``train.batch_size_per_gpu``, the official per-GPU batch). On W processes (GPUs, over
any number of nodes) a step is ``accumulation`` micro-batches of ``per_gpu`` images on each process:
``per_gpu × W × accumulation = batch_size``, ``per_gpu ≤ batch_size_per_gpu``, the fewest micro-batches first.
W must divide ``batch_size``: uneven micro-batches would weight images unequally in the averaged gradient, so
such counts are refused, naming the nearest counts below and above that keep the recipe.

The learning rate follows each official code's rule, which for all of these methods is linear in the effective
batch: peak lr = ``train.lr`` × batch / 256 (``train.lr`` is the rate per 256 images in every preset; LOCA's and
DeiT's official rules are written per 1024 and per 512 images, the same linear rule). Because the effective
batch is kept, the learning rate is the paper's on every accepted count; it changes only when ``batch_size``
itself is changed. ``LR_RULES`` cites each rule.

With ``batch_size: null`` the effective batch is ``batch_size_per_gpu × W`` (no accumulation), as the official
launchers compute it; every count is then accepted and the learning rate scales with it.

Pure Python (no torch): the Snakefile, ``snakemake -n`` and the launcher call it before any job starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from densessl.errors import ConfigError

LR_REFERENCE_BATCH = 256


@dataclass(frozen=True)
class LrRule:
    """How the official code turns its base learning rate and batch into the peak learning rate."""

    official: str   # the official formula, as written there
    source: str     # repository and file


LR_RULES: dict[str, LrRule] = {
    "dino": LrRule("lr = args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.",
                   "facebookresearch/dino main_dino.py (train_dino, lr_schedule)"),
    "selfpatch": LrRule("lr = args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.",
                        "alinlab/SelfPatch main_selfpatch.py (DINO's schedule, unchanged)"),
    "gtsa": LrRule("args.lr = args.blr * eff_batch_size / 256, eff_batch_size = batch_size * accum_iter * world_size",
                   "bok3948/GTSA main_pretrain.py"),
    "loca": LrRule("base_learning_rate = 0.001 * batch_size / 1024",
                   "google-research/scenic projects/loca/configs/loca_imnet1k_base16.py"),
    "clove": LrRule("lr = base_lr * batch_size * world_size / 256 * grad_accumulation_steps",
                    "sthalles/CLoVE main_pretrain.py"),
    "supervised": LrRule("linear_scaled_lr = args.lr * args.batch_size * utils.get_world_size() / 512.0",
                         "facebookresearch/deit main.py"),
}


class GpuCountError(ConfigError):
    """A GPU count that cannot keep the recipe's effective batch."""


@dataclass(frozen=True)
class Recipe:
    method: str
    batch_size: int | None     # images per optimiser step; None: batch_size_per_gpu × GPUs
    batch_size_per_gpu: int    # the largest per-GPU batch (the official one)
    lr: float                  # per 256 images
    where: str = "pretrain.<method>.train"

    @classmethod
    def from_train(cls, method: str, train: dict[str, Any]) -> Recipe:
        """The recipe of ``pretrain.<method>.train`` (defaults: TrainConfig's, DINO's)."""
        where = f"pretrain.{method}.train"
        batch = train.get("batch_size")
        per_gpu = train.get("batch_size_per_gpu", 64)
        for name, value in (("batch_size", batch), ("batch_size_per_gpu", per_gpu)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}.{name}: {value!r}; expected a positive integer")
        return cls(method, batch, per_gpu, float(train.get("lr", 0.0005)), where)


@dataclass(frozen=True)
class BatchPlan:
    """What a run on ``world`` processes uses; recorded in the run's train_summary.json and checkpoints."""

    world: int
    nodes: int
    gpus_per_node: int
    batch_size: int            # images per optimiser step, all processes and micro-batches together
    batch_size_per_gpu: int    # images per micro-batch on one process
    accumulation_steps: int    # micro-batches per optimiser step
    lr: float                  # peak learning rate
    base_lr: float             # train.lr, per 256 images
    lr_rule: str
    lr_source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(batch: int, world: int, per_gpu_max: int) -> tuple[int, int] | None:
    """(per-GPU batch, accumulation) with the fewest micro-batches, or None when ``world`` cannot keep ``batch``."""
    if world < 1 or batch % world:
        return None
    per_process = batch // world
    for accumulation in range(1, per_process + 1):
        if per_process % accumulation == 0 and per_process // accumulation <= per_gpu_max:
            return per_process // accumulation, accumulation
    return None


def accepted(recipe: Recipe, world: int) -> bool:
    return recipe.batch_size is None or _split(recipe.batch_size, world, recipe.batch_size_per_gpu) is not None


def nearest_accepted(recipe: Recipe, world: int) -> list[int]:
    """The closest accepted process counts below and above ``world`` (one or two of them)."""
    assert recipe.batch_size is not None
    below = next((w for w in range(world - 1, 0, -1) if accepted(recipe, w)), None)
    above = next((w for w in range(world + 1, recipe.batch_size + 1) if accepted(recipe, w)), None)
    return [w for w in (below, above) if w is not None]


def _describe(recipe: Recipe, world: int) -> str:
    assert recipe.batch_size is not None
    split = _split(recipe.batch_size, world, recipe.batch_size_per_gpu)
    assert split is not None
    per_gpu, accumulation = split
    return f"{world} (per-GPU batch {per_gpu}" + (f", accumulation {accumulation})" if accumulation > 1 else ")")


def lr_rule(method: str) -> LrRule:
    return LR_RULES.get(method, LR_RULES["dino"])


def plan_batch(recipe: Recipe, nodes: int, gpus_per_node: int) -> BatchPlan:
    """The per-GPU batch, accumulation and learning rate of ``recipe`` on ``nodes × gpus_per_node`` processes.

    Raises ``GpuCountError`` naming the reason and the nearest accepted counts."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"{recipe.where}: {nodes} node(s) × {gpus_per_node} GPU(s) per node; both must be ≥ 1")
    world = nodes * gpus_per_node
    rule = lr_rule(recipe.method)
    if recipe.batch_size is None:
        per_gpu, accumulation, batch = recipe.batch_size_per_gpu, 1, recipe.batch_size_per_gpu * world
    else:
        batch = recipe.batch_size
        split = _split(batch, world, recipe.batch_size_per_gpu)
        if split is None:
            if world > batch:
                reason = f"more processes than the {batch} images of one step"
            else:  # any divisor of the batch is accepted (per-GPU batch 1 at worst)
                reason = f"{batch} images per step do not split evenly over {world} processes"
            near = " or ".join(_describe(recipe, w) for w in nearest_accepted(recipe, world))
            raise GpuCountError(
                f"{recipe.where}: {world} GPU(s) ({nodes} node(s) × {gpus_per_node}) cannot keep the recipe's "
                f"effective batch of {batch} images per step (batch_size): {reason}. Nearest GPU counts that keep "
                f"it: {near}. Use one of those (train.nodes, train.nproc_per_node, or launch --nodes/"
                f"--gpus-per-node), or change the recipe with {recipe.where}.batch_size (the learning rate follows "
                f"it: {rule.official}, {rule.source})")
        per_gpu, accumulation = split
    return BatchPlan(world=world, nodes=nodes, gpus_per_node=gpus_per_node, batch_size=batch,
                     batch_size_per_gpu=per_gpu, accumulation_steps=accumulation,
                     lr=recipe.lr * batch / LR_REFERENCE_BATCH, base_lr=recipe.lr,
                     lr_rule=f"linear: train.lr × batch / {LR_REFERENCE_BATCH} (official: {rule.official})",
                     lr_source=rule.source)
