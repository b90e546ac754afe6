"""Settings of the ImageNet k-NN classifier (``evaluate.knn_imagenet``).

The protocol (:mod:`densessl.evaluate.knn`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from densessl.errors import ConfigError


@dataclass
class KnnConfig:
    """Defaults are ``eval_knn.py``'s argparse defaults."""

    nb_knn: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # --nb_knn
    report_k: int = 20  # the README's k-NN column (help text: "20 is usually working the best")
    temperature: float = 0.07  # --temperature
    batch_size: int = 128  # --batch_size_per_gpu
    num_workers: int = 0  # --num_workers 10; a smoke run needs none
    crop_size: int | None = None  # CenterCrop(224); None = the backbone's native input size
    resize_size: int | None = None  # Resize(256); None = round(crop_size * 256 / 224)
    max_train_items: int | None = None  # evenly spaced subset (smoke)
    max_val_items: int | None = None

    def validate(self) -> None:
        if not self.nb_knn or min(self.nb_knn) < 1:
            raise ConfigError(f"knn config: nb_knn={self.nb_knn} must be a non-empty list of k >= 1")
        if self.report_k not in self.nb_knn:
            raise ConfigError(f"knn config: report_k={self.report_k} must be one of nb_knn={self.nb_knn}")
        if self.temperature <= 0 or self.batch_size < 1:
            raise ConfigError("knn config: temperature must be > 0 and batch_size >= 1")
