"""Settings of the iNaturalist-2019 fine-tuning (``evaluate.inat19_finetune``).

The protocol (:mod:`densessl.evaluate.inat_finetune`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.errors import ConfigError

POOLS = ("mean_patch", "cls")
LR_MODES = ("absolute", "blr")
PRECISIONS = ("bf16", "fp32")
REPORTS = ("final", "best")


@dataclass
class InatFinetuneConfig:
    """Defaults: GTSA's README command and ``main_finetune.py`` argument defaults
    (bok3948/GTSA @ c0dfe2b, ``downstream/classification/iNat19_classification/``)."""

    # schedule
    epochs: int = 300  # README --epochs 300 (script default 100)
    warmup_epochs: float = 5.0  # --warmup_epochs default 5
    batch_size: int = 1024  # effective batch: README --batch_size 128 per GPU x 8 GPUs, --accum_iter 1
    accum_iter: int = 1  # micro-batches per update (8 = the official per-GPU batch of 128; see module doc)
    lr_mode: str = "absolute"  # reference recommendation: --lr defaults to 1.4e-4, so --blr is ignored
    lr: float = 1.4e-4  # --lr default (absolute lr used by the README command)
    blr: float = 5e-4  # README --blr 5e-4; lr = blr * batch_size / 256 when lr_mode == 'blr'
    min_lr: float = 1e-6  # --min_lr default
    weight_decay: float = 0.05  # README --weight_decay 0.05
    layer_decay: float = 0.65  # README --layer_decay 0.65 (script default 0.75)
    betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.AdamW defaults (main_finetune.py passes none)
    clip_grad: float | None = None  # --clip_grad default None: no clipping
    # model
    drop_path: float = 0.1  # README --drop_path 0.1
    pool: str = "mean_patch"  # models_vit.py forward: x[:, 1:].mean(1) (global_pool default True); or 'cls'
    final_norm: bool = False  # models_vit.py forward: "#x = self.norm(x)" is commented out
    head_norm: bool = True  # mlp_head = Sequential(LayerNorm(D), Linear(D, C))
    head_init_std: float = 2e-5  # main_finetune.py: trunc_normal_(mlp_head[*].weight, std=2e-5)
    head_norm_init_quirk: bool = True  # also re-init the LayerNorm gain with std 2e-5 (official quirk)
    num_classes: int | None = None  # None = len(categories) of train2019.json (1010, hard-coded officially)
    # data
    input_size: int = 224  # --input_size default 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range: timm default (not an official flag)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # --aa default
    color_jitter: float = 0.4  # --color_jitter default (timm disables it while RandAugment is on)
    interpolation: str = "bicubic"  # util/datasets.py build_transform
    reprob: float = 0.25  # README --reprob 0.25
    remode: str = "pixel"  # --remode default
    recount: int = 1  # --recount default
    eval_crop_pct: float = 224 / 256  # util/datasets.py: crop_pct 224/256 for input_size <= 224, else 1.0
    # mixup / cutmix / label smoothing
    mixup: float = 0.8  # README --mixup 0.8
    cutmix: float = 1.0  # README --cutmix 1.0
    cutmix_minmax: tuple[float, float] | None = None  # --cutmix_minmax default None
    mixup_prob: float = 1.0  # --mixup_prob default
    mixup_switch_prob: float = 0.5  # --mixup_switch_prob default
    mixup_mode: str = "batch"  # --mixup_mode default
    smoothing: float = 0.1  # --smoothing default
    # evaluation and bookkeeping
    eval_batch_size: int = 128  # official val loader uses --batch_size (128 per GPU)
    eval_every: int = 1  # engine: evaluate after every epoch
    report: str = "final"  # which epoch's top-1/top-5 is the result: 'final' or 'best' (MAE prints max acc)
    seed: int = 0  # --seed default
    num_workers: int = 10  # --num_workers default
    max_train_items: int | None = None  # first N images of train2019.json (smoke runs)
    max_val_items: int | None = None
    precision: str = "bf16"  # bf16 autocast on CUDA (official: fp16 NativeScaler AMP); fp32 on CPU
    # Optimiser updates between saves of the training state (only when the runner gets a state_path; 0 = save
    # only on SIGTERM/SIGUSR1). Counted in updates, not epochs, so that what a hard kill (node failure, SIGKILL
    # after the grace period) can lose does not grow with the dataset: at paper scale an epoch is 259 updates
    # (265k images / batch 1024), so 500 is ~2 epochs, and one save of ViT-B + AdamW is ~1 GB.
    checkpoint_every: int = 500

    def validate(self) -> None:
        for name, value, allowed in (("pool", self.pool, POOLS), ("lr_mode", self.lr_mode, LR_MODES),
                                     ("precision", self.precision, PRECISIONS), ("report", self.report, REPORTS)):
            if value not in allowed:
                raise ConfigError(f"inat_finetune config: {name}={value!r} is not one of {list(allowed)}")
        for name in ("epochs", "batch_size", "accum_iter", "input_size", "eval_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inat_finetune config: {name}={getattr(self, name)} must be >= 1")
        if self.batch_size % self.accum_iter:
            raise ConfigError(f"inat_finetune config: batch_size={self.batch_size} is not divisible by "
                              f"accum_iter={self.accum_iter}")
        if self.mixup_active and (self.batch_size // self.accum_iter) % 2:
            raise ConfigError(f"inat_finetune config: mixup/cutmix need an even micro-batch; "
                              f"batch_size // accum_iter = {self.batch_size // self.accum_iter}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"inat_finetune config: layer_decay={self.layer_decay} must be in (0, 1]")
        if not 0 < self.eval_crop_pct <= 1:
            raise ConfigError(f"inat_finetune config: eval_crop_pct={self.eval_crop_pct} must be in (0, 1]")
        if self.warmup_epochs < 0 or self.num_workers < 0 or self.smoothing < 0 or self.checkpoint_every < 0:
            raise ConfigError("inat_finetune config: warmup_epochs, num_workers, smoothing and checkpoint_every "
                              "must be >= 0")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"inat_finetune config: crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        if self.cutmix_minmax is not None:
            self.cutmix_minmax = tuple(float(v) for v in self.cutmix_minmax)  # type: ignore[assignment]

    @property
    def mixup_active(self) -> bool:
        """``main_finetune.py``: mixup_active = mixup > 0 or cutmix > 0 or cutmix_minmax is not None."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def peak_lr(self) -> float:
        """``main_finetune.py``: lr is used as given; blr * eff_batch / 256 only replaces it when lr is None."""
        return self.lr if self.lr_mode == "absolute" else self.blr * self.batch_size / 256
