"""CLoVE's settings (``pretrain.clove.method``); each field cites its official source.

The method (:mod:`densessl.methods.clove`) reads them. They live apart from its torch code so that the settings
check of ``snakemake -n`` (``densessl.settings_check``) builds them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from densessl.errors import ConfigError


@dataclass
class CLoVEConfig:
    projector_hidden_dim: int = 4096      # Proj_Head / MLP2d inner_dim (contrast/models/CLoVE.py)
    projector_out_dim: int = 256          # --feature-dim; also nn.MultiheadAttention embed_dim (hard-coded 256)
    attn_heads: int = 8                   # --clove-attn-heads
    # The paper calls the layer "normalized multi-head self-attention"; the released code applies no
    # normalisation or temperature inside the attention, only L2 on its output (contrast/models/CLoVE.py;
    # `--attn-temp` is parsed but never used). True L2-normalises the projector output per location before
    # the attention.
    normalize_attention_input: bool = False
    pos_ratio: float = 0.7                # --clove-pos-ratio (option default, config.json; 400-ep script passes 2)
    gamma: float = 2.0                    # --lamb: weight of the positives in the ranking loss
    margin: float = 100.0                 # TripletLoss MarginRankingLoss(margin=100.), hard-coded
    negatives_topk: int = 10              # torch.topk(masked_logits, 10, largest=False) in contrast/loss.py
    negatives_skip: int = 1               # negatives[:, :, 1:]: the most similar non-positive is dropped
    zero_init_residual: bool = True       # contrast/resnet.py: every bottleneck's bn3.weight starts at 0
    global_size: int = 224                # transform_1/2 RandomResizedCropCoord(image_size=224)
    local_size: int = 96                  # transform_3 RandomResizedCropCoord(96)
    global_crops_scale: tuple[float, float] = (0.2, 1.0)   # --crop 0.2 (0.24 in the 50/100-ep scripts)
    local_crops_scale: tuple[float, float] = (0.08, 0.3)   # transform_3 scale=(0.08, 0.3)
    local_crops_number: int = 6           # dataset.py hard-codes 6 (--local-crops-number is ignored)
    global_blur_prob: tuple[float, float] = (1.0, 0.1)     # BYOL: GaussianBlur p 1.0 (view 1) / 0.1 (view 2)
    global_solarize_prob: tuple[float, float] = (0.0, 0.2)  # BYOL: solarize only in view 2, p 0.2
    local_blur_prob: float = 0.5          # transform_3 GaussianBlur p 0.5, no solarize
    blur_radius: tuple[float, float] = (0.1, 2.0)          # transform.py GaussianBlur sigma ~ U(0.1, 2.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # ColorJitter(0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8        # RandomApply(ColorJitter, p=0.8)
    grayscale_prob: float = 0.2           # RandomGrayscale(p=0.2)
    # The official converters (transfer/detection/convert_pretrain_to_d2.py) keep
    # `module.encoder.`, the online (student) encoder; "teacher" exports the EMA encoder instead.
    export_weights: str = "student"       # student | teacher

    def validate(self) -> None:
        where = "pretrain.clove.method"
        if self.projector_out_dim % self.attn_heads:
            raise ConfigError(f"{where}.attn_heads={self.attn_heads} must divide projector_out_dim="
                              f"{self.projector_out_dim} (nn.MultiheadAttention splits the channels into heads)")
        if self.pos_ratio <= 0:
            raise ConfigError(f"{where}.pos_ratio={self.pos_ratio} must be > 0 (official 0.7)")
        if not 0 <= self.negatives_skip < self.negatives_topk:
            raise ConfigError(f"{where}: need 0 ≤ negatives_skip ({self.negatives_skip}) < negatives_topk "
                              f"({self.negatives_topk}); official 1 and 10")
        if self.local_crops_number < 0:
            raise ConfigError(f"{where}.local_crops_number={self.local_crops_number} must be ≥ 0 (official 6)")
        if self.export_weights not in ("student", "teacher"):
            raise ConfigError(f"{where}.export_weights: {self.export_weights!r}; allowed values: student, teacher")
