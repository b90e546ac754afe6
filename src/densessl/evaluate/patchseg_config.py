"""Settings of the Patch-Seg probes (``evaluate.patchseg``).

The protocol (:mod:`densessl.evaluate.patchseg`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.data.coco import COCO_CLASS_SETS
from densessl.errors import ConfigError

DATASETS = ("coco", "ade20k")
PRECISIONS = ("bf16", "fp32")

LABEL_REDUCTIONS = ("union", "majority", "global-union")

HEADS = ("linear", "mlp", "transformer", "transformer-cls", "transformer-separate")
UNION_ONLY_HEADS = ("transformer-cls", "transformer-separate")


def check_head(head: str, label_reduction: str) -> None:
    """Refuse an intervention head with image-level or majority labels (the official code asserts union)."""
    if head in UNION_ONLY_HEADS and label_reduction != "union":
        raise ConfigError(f"patchseg config: head={head!r} predicts one union label set per patch from its latent "
                          f"tokens and exists only with label_reduction: union (official scripts/train.py "
                          f"prepare_output_head asserts it), not {label_reduction!r}; use label_reduction: union, "
                          f"or head: transformer / mlp / linear for {label_reduction}")


@dataclass
class PatchSegConfig:
    """Defaults are the official ``scripts/train.py`` defaults (iancovert/patch-seg @ fc14f36)."""

    dataset: str = "coco"  # --dataset coco | ade20k
    label_reduction: str = "union"  # --label-reduction (official default union)
    head: str = "transformer"  # --output-head (official default transformer; -cls / -separate: union only)
    hidden_size: int = 1024  # --hidden-size (mlp head)
    num_layers: int = 2  # --num-layers (transformer head)
    batch_size: int = 32  # --batch-size
    epochs: int = 5  # --num-epochs
    lr: float = 1e-3  # --lr
    min_lr: float = 1e-4  # --min-lr
    weight_decay: float = 0.01  # --weight-decay
    warmup_steps: int = 500  # --warmup-steps
    seed: int = 0  # --seed
    num_workers: int = 0  # data loader workers (official 24; a smoke run needs none)
    max_train_items: int | None = None  # first N sorted training images (smoke runs)
    max_val_items: int | None = None
    class_balanced: bool = False  # not official: see densessl.evaluate.patchseg's docstring
    class_balance_max_weight: float = 1000.0  # clip for class_balanced weights (rare classes)
    precision: str = "bf16"  # --dtype bfloat16; autocast only on CUDA, fp32 elsewhere
    cache_features: bool = True  # precompute frozen-backbone tokens once (see densessl.evaluate.patchseg)
    feature_cache_max_gb: float = 48.0  # stream instead when a split's tokens would exceed this
    threshold: float = 0.5  # detection threshold of the union metrics (official 0.5)
    class_set: str = "all"  # CocoPatchDataset(class_set=...): all (183) | things (92, stuff -> 0); coco only
    skip_blocks: int = 0  # --skip-blocks: drop the last k transformer blocks (final norm kept)
    full_finetune: bool = False  # --full-finetune: train the backbone with the head (no feature cache)
    size_buckets: int = 10  # SizeUnionMetricsHelper(num_buckets) of the union validation; 0 = off

    def __post_init__(self) -> None:
        self.validate()  # the settings check builds this class when the configuration loads: errors surface then

    def validate(self) -> None:
        for name, value, allowed in (("dataset", self.dataset, DATASETS),
                                     ("label_reduction", self.label_reduction, LABEL_REDUCTIONS),
                                     ("head", self.head, HEADS), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ConfigError(f"patchseg config: {name}={value!r} is not one of {list(allowed)}")
        for name in ("batch_size", "epochs", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"patchseg config: {name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("patchseg config: warmup_steps and num_workers must be >= 0")
        if self.class_set not in COCO_CLASS_SETS:
            raise ConfigError(f"patchseg config: class_set={self.class_set!r} is not one of {sorted(COCO_CLASS_SETS)}")
        if self.class_set != "all" and self.dataset != "coco":
            raise ConfigError(f"patchseg config: class_set={self.class_set!r} exists only for coco; use "
                              f"class_set: all for {self.dataset}")
        if self.skip_blocks < 0 or self.size_buckets < 0:
            raise ConfigError("patchseg config: skip_blocks and size_buckets must be >= 0")
        check_head(self.head, self.label_reduction)
