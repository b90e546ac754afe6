"""Settings of the ImageNet linear classifier (``evaluate.linear_imagenet``).

The protocol (:mod:`densessl.evaluate.linear_cls`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.errors import ConfigError


@dataclass
class LinearClsConfig:
    """Defaults are ``eval_linear.py``'s argparse defaults (batch: one GPU's 128)."""

    # --n_last_blocks / --avgpool_patchtokens; None = the help text's choice for the backbone's width:
    # "n=4 when evaluating ViT-Small and n=1 with ViT-Base", avgpool "False for ViT-Small, True with ViT-Base"
    # (embed_dim >= 768 counts as ViT-Base). The argparse defaults are 4 / False.
    n_last_blocks: int | None = None
    avgpool_patchtokens: bool | None = None
    epochs: int = 100  # --epochs
    lr: float = 0.001  # --lr, at batch 256 (scaled by batch_size / 256)
    batch_size: int = 128  # --batch_size_per_gpu x GPUs (the total batch)
    momentum: float = 0.9  # SGD momentum (hard-coded)
    weight_decay: float = 0.0  # "we do not apply weight decay"
    val_freq: int = 1  # --val_freq
    seed: int = 0
    num_workers: int = 0  # --num_workers 10; a smoke run needs none
    crop_size: int | None = None  # 224; None = the backbone's native input size
    resize_size: int | None = None  # 256; None = round(crop_size * 256 / 224)
    max_train_items: int | None = None  # evenly spaced subset (smoke / tests)
    max_val_items: int | None = None
    checkpoint_every: int = 0  # batches between state saves (0 = at epoch ends only); needs a state_path
    eval_batch_size: int = 128

    def resolved(self, embed_dim: int) -> tuple[int, bool]:
        """(n_last_blocks, avgpool_patchtokens) for a ViT of width ``embed_dim``."""
        base = embed_dim >= 768
        n = self.n_last_blocks if self.n_last_blocks is not None else (1 if base else 4)
        avg = self.avgpool_patchtokens if self.avgpool_patchtokens is not None else base
        return n, avg

    def validate(self) -> None:
        if self.n_last_blocks is not None and self.n_last_blocks < 1:
            raise ConfigError(f"linear_imagenet config: n_last_blocks={self.n_last_blocks} must be >= 1 (or null)")
        for name in ("epochs", "batch_size", "val_freq", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"linear_imagenet config: {name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.checkpoint_every < 0:
            raise ConfigError("linear_imagenet config: lr must be > 0 and checkpoint_every >= 0")
