"""Settings of the ADE20K linear segmentation (``evaluate.linear_ade20k``).

The protocol (:mod:`densessl.evaluate.linear_seg`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.data.ade20k import ADE_NUM_CLASSES
from densessl.errors import ConfigError


@dataclass
class LinearSegConfig:
    """Defaults: Segmenter's ADE20K recipe (official repo rstrudel/segmenter @ 20d1bfa, files
    ``segm/config.yml``, ``segm/train.py`` and ``segm/data/config/ade20k.py``)."""

    crop_size: int = 512  # "Random crop 512x512" / table: crop 512
    base_scale: tuple[int, int] = (2048, 512)  # "Random resize, ratio 0.5-2.0 of base scale 2048x512"
    ratio_range: tuple[float, float] = (0.5, 2.0)  # same line
    cat_max_ratio: float = 0.75  # "Random crop 512x512, cat_max_ratio 0.75"
    flip: float = 0.5  # "Horizontal flip 0.5"
    photometric: bool = True  # "photometric distortion"
    batch_size: int = 8  # Schedule: batch 8
    iterations: int = 160_000  # Schedule: 64 epochs ~ 160k iterations
    lr: float = 1e-3  # Schedule: SGD lr 1e-3
    momentum: float = 0.9  # Schedule: momentum 0.9
    weight_decay: float = 0.0  # Schedule: weight decay 0
    poly_power: float = 0.9  # Schedule: polynomial, power 0.9, no warm-up
    min_lr: float = 1e-5  # Schedule: min lr 1e-5
    drop_path: float = 0.1  # Model: drop-path 0.1 (linearly increasing over blocks, as Segmenter's ViT)
    finetune_backbone: bool = True  # Model: "fine-tuned end to end"; False = frozen linear probe
    eval_window: int = 512  # Evaluation: sliding window 512
    eval_stride: int = 512  # Evaluation: stride 512
    eval_scale: tuple[int, int] | None = None  # test-pipeline resize; None = base_scale (as the config)
    # Segmenter reports single-scale, and multi-scale with flip, mIoU. With ms_flip the metrics gain an
    # "ms_flip" block next to the single-scale ones: mmseg MultiScaleFlipAug (keep-ratio resize of the eval
    # scale × each ratio, plus the horizontal flip), softmax outputs averaged (mmseg EncoderDecoder.aug_test).
    eval_ms_flip: bool = False
    eval_ms_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg ADE20K img_ratios
    num_classes: int = ADE_NUM_CLASSES  # 150 classes
    reduce_zero_label: bool = True  # Data: "Label 0 (other/unlabelled) is ignored (reduce_zero_label)"
    seed: int = 0
    num_workers: int = 0
    max_train_items: int | None = None  # first N sorted images (smoke runs)
    max_val_items: int | None = None
    precision: str = "fp32"  # 'bf16' = bfloat16 autocast, CUDA only (Segmenter's --amp is off by default)
    eval_batch_size: int = 8  # sliding windows forwarded together (a speed knob; results unchanged)
    # Iterations between saves of the training state (only when the runner gets a state_path; 0 = save only on
    # SIGTERM/SIGUSR1). A hard kill (node failure, SIGKILL after the grace period) loses at most this much:
    # 2000 iterations are minutes at paper scale, while one save of ViT-B + SGD momentum is ~0.7 GB.
    checkpoint_every: int = 2000

    def validate(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"linear_seg config: precision={self.precision!r} is not 'bf16' or 'fp32'")
        for name in ("crop_size", "batch_size", "iterations", "eval_window", "eval_stride", "num_classes",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"linear_seg config: {name}={getattr(self, name)} must be >= 1")
        if self.checkpoint_every < 0 or self.num_workers < 0:
            raise ConfigError(f"linear_seg config: checkpoint_every={self.checkpoint_every} and "
                              f"num_workers={self.num_workers} must be >= 0")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ConfigError(f"linear_seg config: ratio_range={self.ratio_range} must satisfy 0 < lo <= hi")
        self.base_scale = tuple(int(v) for v in self.base_scale)  # type: ignore[assignment]
        if self.eval_scale is not None:
            self.eval_scale = tuple(int(v) for v in self.eval_scale)  # type: ignore[assignment]
        self.ratio_range = tuple(float(v) for v in self.ratio_range)  # type: ignore[assignment]
