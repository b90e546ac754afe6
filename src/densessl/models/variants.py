"""Architecture variants: the changes some methods' official code makes to the standard ViT.

One table, read by the methods (to build their networks), by the checkpoint importers (to rebuild released
backbones) and by the configuration (to give each variant its own random-init baseline rows). It imports
nothing heavy, because the Snakefile reads it while building the DAG.

The random-init rows use the variant's architecture and its method's initialisation, i.e. the network the
method starts training from, so a margin measures what training changed. Why the baseline needs the variant:
a random-init ViT without final LayerNorm (SelfPatch's) scores Patch-Seg 0.156 on the smoke data against 0.22
for the standard ViT (measured, 2 seeds each), so comparing a SelfPatch backbone with the standard ViT's
random init would charge the architecture to the pretraining.
"""

from __future__ import annotations

from typing import Any

# method name → keyword arguments of models.backbones.create_backbone (ViT architectures only)
ARCH_VARIANTS: dict[str, dict[str, Any]] = {
    # scenic projects/loca/vit.py: flax ViT with no CLS token, tanh-approximated GELU, final encoder_norm kept,
    # positional embedding resized with jax.image.resize 'bilinear' (antialiased) at other grids
    "loca": {"class_token": False, "gelu_tanh": True, "pos_resample": "scenic"},
    # alinlab/SelfPatch selfpatch_vision_transformer.py: no CLS token and no final LayerNorm (the aggregation
    # head normalises)
    "selfpatch": {"class_token": False, "final_norm": False},
}

# method name → create_backbone keyword arguments that only set the initial values. The random-init baseline is
# the method's network at step 0, so it is drawn the same way (not stored with exported weights: loading
# overwrites every value). LOCA: timm's flax-ViT init, as scenic's Encoder1DBlock; it matters:
# a random LOCA ViT scores Patch-Seg 0.17 with it and 0.22 with timm's default init (measured, 2 seeds).
# Both the methods and the convert stage's random-init rows build from this table, and
# tests/test_variants.py checks that a random-init row equals the method's step-0 network (e.g. LOCA's
# positional embedding is N(0, 1/D), not timm's N(0, 0.02)).
# CLoVE: torchvision's ResNet with zero_init_residual=True (sthalles/CLoVE contrast/resnet.py zero-initialises
# each bottleneck's bn3.weight; CLoVEConfig's default); a ResNet with it off scores Patch-Seg 0.08-0.09
# against 0.105-0.113 with it (3 seeds).
INIT_KWARGS: dict[str, dict[str, Any]] = {
    "loca": {"weight_init": "jax", "pos_embed_init": "flax"},
    "clove": {"zero_init_residual": True},
}

# the architecture family each method's variant applies to (models/resnet.py RESNET_ARCHS start with "resnet")
VARIANT_FAMILY: dict[str, str] = {"loca": "vit", "selfpatch": "vit", "clove": "resnet"}

VARIANT_DISPLAY: dict[str, str] = {
    "loca": "LOCA variant",
    "selfpatch": "SelfPatch variant",
    "clove": "CLoVE init",
}


def variant_of(method_or_format: str, arch: str) -> str | None:
    """The variant a method (or a released-checkpoint format of the same name) trains for ``arch``: its own
    architecture changes and/or its own initialisation; None = the standard architecture and timm's or
    torchvision's default init."""
    family = "resnet" if arch.startswith("resnet") else "vit"
    return method_or_format if VARIANT_FAMILY.get(method_or_format) == family else None


def variant_init_kwargs(variant: str | None) -> dict[str, Any]:
    """Keyword arguments that draw the variant's initial weights as its method does; {} = timm's default."""
    return dict(INIT_KWARGS.get(variant or "", {}))


def variant_kwargs(variant: str | None) -> dict[str, Any]:
    """Keyword arguments for create_backbone; {} for the standard architecture."""
    if variant is None:
        return {}
    if variant not in VARIANT_FAMILY:
        raise KeyError(f"unknown architecture variant {variant!r}; known: {sorted(VARIANT_FAMILY)}")
    return dict(ARCH_VARIANTS.get(variant, {}))
