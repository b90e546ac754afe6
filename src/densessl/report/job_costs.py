"""What one DAG job costs before it runs: GPU-hours from a measured or published figure, and disk.

A figure is used only where one exists; every estimate names it. A job with no figure gets ``gpu_hours`` None
and the reason, and the plan leaves it out of its totals (counting such jobs), never guessing a number.

* Pretraining: images × epochs / (images/s per GPU), the per-GPU throughput of
  ``densessl.launch.time_plan.throughput`` (this project's measurement on one H100, or the site's
  ``slurm.throughput``), without the scheduler's safety factor or start-up allowance (those size time limits,
  not work).
* Evaluations: the published training time of the official schedule where a primary source gives one.
  detectron2's MODEL_ZOO.md (facebookresearch/detectron2 at 02478d2e, "COCO Instance Segmentation Baselines with
  Mask R-CNN", measured on 8 V100s) gives s/iter for Mask R-CNN R50-C4 1x (0.584) and R50-FPN 1x (0.261); the
  1x schedule is 90,000 iterations. Our protocols run mmdetection's implementation of the same models, so the
  figure is a published one for another implementation on older GPUs, and says so. The frozen-feature
  protocols' throughput in docs/performance.md covers parts of a job (feature extraction, one training step),
  not a whole job, so they have no figure here.
* Disk: a dataset's published archive sizes (data/catalog.yaml); a pretraining run's checkpoints from its
  backbone's parameter count (DINO arXiv 2104.14294 Table 2 and ResNet-50's torchvision count) × 4 bytes (fp32)
  × (student + EMA teacher, the supervised reference has none + the optimizer's moments: AdamW 2, SGD and LARS
  1) × 3 kept files (checkpoint.pt, checkpoint.previous.pt and final.pt, a copy of the last: trainer.py,
  stages/pretrain.py); a convert job's exported fp32 backbone. Projection heads are not counted.

Pure Python, no torch: ``densessl plan`` answers in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from densessl.config import Config, Run
from densessl.launch.resources import site_of, train_images
from densessl.launch.time_plan import throughput

NO_FIGURE = "no measured figure"

# backbone parameters (without heads): DINO arXiv 2104.14294 Table 2 (ViT-S/16 21M, ViT-B/16 85M); ResNet-50
# without its fc layer: torchvision resnet50 25,557,032 parameters less fc's 2,049,000
PARAMETERS: dict[str, int] = {"vit-s16": 21_000_000, "vit-s8": 21_000_000, "vit-b16": 85_000_000,
                              "vit-b8": 85_000_000, "resnet50": 23_508_032}
FP32 = 4
OPTIMIZER_MOMENTS = {"adamw": 2, "sgd": 1, "lars": 1}  # state tensors per parameter (torch.optim, train/lars.py)
KEPT_CHECKPOINTS = 3                 # checkpoint.pt, checkpoint.previous.pt, final.pt

_DETECTRON2 = ("published: detectron2 MODEL_ZOO.md (02478d2e), {model} 1x, {s} s/iter × 90,000 iterations on 8 "
               "V100 (detectron2's implementation; ours runs mmdetection's)")
# protocol -> (backbone arch the figure is for, s/iter, model name)
PUBLISHED_EVAL: dict[str, tuple[str, float, str]] = {
    "maskrcnn_r50_c4_coco": ("resnet50", 0.584, "Mask R-CNN R50-C4"),
    "maskrcnn_r50_fpn_coco": ("resnet50", 0.261, "Mask R-CNN R50-FPN"),
}
PUBLISHED_GPUS = 8
PUBLISHED_ITERATIONS = 90_000


@dataclass(frozen=True)
class Cost:
    gpu_hours: float | None
    source: str               # the measurement or published figure used, or why there is none
    disk_bytes: int = 0
    disk_source: str = ""
    detail: str = ""          # how the figure becomes this job's GPU-hours


def pretrain_cost(cfg: Config, run: Run) -> Cost:
    """GPU-hours of one pretraining run from its measured per-GPU throughput; disk of its checkpoints."""
    disk, disk_source = checkpoint_bytes(cfg, run)
    figure = throughput(run.method, run.arch, site_of(cfg))
    train = cfg.pretrain_settings(run)["train"]
    images = train_images(cfg, run)
    if figure is None:
        return Cost(None, f"{NO_FIGURE} for {run.method}/{run.arch}", disk, disk_source)
    if images is None:
        return Cost(None, f"no training image count for {run.data} (data/catalog.yaml)", disk, disk_source)
    epochs = int(train.get("epochs", 100))
    hours = images * epochs / figure.images_per_s / 3600.0
    return Cost(hours, figure.source, disk, disk_source,
                f"{images} images × {epochs} epochs at {figure.images_per_s:g} img/s per GPU")


def evaluate_cost(cfg: Config, protocol: str, run: Run) -> Cost:
    """GPU-hours of one evaluation where a published figure for its official schedule exists."""
    spec = PUBLISHED_EVAL.get(protocol)
    if spec is None or spec[0] != run.arch or cfg.eval_settings(protocol).get("schedule", "1x") != "1x":
        return Cost(None, f"{NO_FIGURE} for {protocol} on {run.arch}")
    _, seconds, model = spec
    hours = seconds * PUBLISHED_ITERATIONS / 3600.0 * PUBLISHED_GPUS
    return Cost(hours, _DETECTRON2.format(model=model, s=seconds))


def checkpoint_bytes(cfg: Config, run: Run) -> tuple[int, str]:
    """Bytes of a pretraining run's kept checkpoints, with how they are counted."""
    params = PARAMETERS.get(run.arch)
    if params is None:
        return 0, f"no parameter count for {run.arch}: checkpoints not counted"
    optimizer = cfg.pretrain_settings(run)["train"].get("optimizer") or "adamw"
    copies = (1 if run.is_supervised else 2) + OPTIMIZER_MOMENTS.get(optimizer, 2)
    return params * FP32 * copies * KEPT_CHECKPOINTS, (
        f"{params:,} backbone parameters × {FP32} B × {copies} (networks and {optimizer} moments) × "
        f"{KEPT_CHECKPOINTS} checkpoints; heads not counted")


def backbone_bytes(arch: str) -> int:
    """An exported backbone (the convert job's output)."""
    return PARAMETERS.get(arch, 0) * FP32


@cache
def dataset_bytes(dataset: str) -> tuple[int, int]:
    """(published bytes of the dataset's files, files without a published size) from data/catalog.yaml."""
    from densessl.data.catalog import load_catalog

    spec = load_catalog().get(dataset)
    if spec is None:
        return 0, 0
    return sum(f.size or 0 for f in spec.files), sum(f.size is None for f in spec.files)
