"""Settings of the DAVIS-2017 label propagation (``evaluate.davis2017``).

The protocol (:mod:`densessl.evaluate.davis_propagation`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.errors import ConfigError

BOUND_TH = 0.008  # davis2017-evaluation metrics.py f_measure(bound_th=0.008)

PRECISIONS = ("fp32", "bf16")


@dataclass
class DavisConfig:
    """Every published value, with its source (facebookresearch/dino ``eval_video_segmentation.py`` = "script";
    davisvideochallenge/davis2017-evaluation @ ac7c43f = "evaluator")."""

    split: str = "val"  # script reads ImageSets/2017/val.txt; evaluator --set default 'val'
    resolution: str = "480p"  # script: JPEGImages/480p/<video>
    n_last_frames: int = 7  # script --n_last_frames 7 (context = first frame + 7 previous frames)
    size_mask_neighborhood: int = 12  # script --size_mask_neighborhood 12 (+-12 patches: a 25x25 window; 0 = global)
    topk: int = 5  # script --topk 5
    temperature: float = 0.1  # script label_propagation: exp(aff / 0.1), hard-coded
    short_side: int = 480  # script read_frame(scale_size=[480]): shorter side -> 480
    size_multiple: int = 64  # script read_frame: longer side floored to a multiple of 64 (854 -> 832)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # script color_normalize
    std: tuple[float, float, float] = (0.228, 0.224, 0.225)  # script color_normalize (0.228 sic, kept for parity)
    final_norm: bool = True  # script: get_intermediate_layers(n=1) = last block + final norm (SelfPatch's copy: False)
    void_as_background: bool = True  # not in the script (see densessl.evaluate.davis_propagation); no effect on DAVIS 2017
    bound_th: float = BOUND_TH  # evaluator f_measure(bound_th=0.008)
    feature_batch_size: int = 8  # frames per backbone forward (script: 1; its --bs 6 is unused); speed only
    query_chunk_size: int = 4096  # target patches per affinity block; memory only
    precision: str = "fp32"  # script runs fp32; 'bf16' = bfloat16 autocast for the backbone only (CUDA)
    max_sequences: int | None = None  # first N sequences of the split (smoke runs); None = all 30 val sequences
    show_progress: bool = False  # tqdm bar per sequence

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"davis config: precision={self.precision!r} is not one of {list(PRECISIONS)}")
        for name in ("n_last_frames", "size_mask_neighborhood"):
            if getattr(self, name) < 0:
                raise ConfigError(f"davis config: {name}={getattr(self, name)} must be >= 0")
        for name in ("topk", "short_side", "size_multiple", "feature_batch_size", "query_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"davis config: {name}={getattr(self, name)} must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"davis config: temperature={self.temperature} must be > 0 (script: 0.1)")
        if not self.bound_th > 0:
            raise ConfigError(f"davis config: bound_th={self.bound_th} must be > 0 (evaluator: 0.008)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("davis config: mean and std need 3 values (RGB)")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]

    def check_patch_size(self, patch_size: int) -> None:
        """Frames must cut into whole patches: the script divides sizes by the patch size with ``int``."""
        for name in ("short_side", "size_multiple"):
            if getattr(self, name) % patch_size:
                raise ConfigError(f"davis config: {name}={getattr(self, name)} is not a multiple of the backbone's "
                                  f"patch size {patch_size}; resized frames must be whole patches")
