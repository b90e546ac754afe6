"""Report names of the architectures, as the papers write them.

Apart from models.backbones because the report reads them, and the report stage imports no torch, timm or
torchvision (3 CPU seconds of a job's start-up) for a table of strings.
"""

ARCH_DISPLAY = {
    "vit-tiny-p8": "ViT-Tiny/8 (smoke)",
    "vit-s16": "ViT-S/16",
    "vit-b16": "ViT-B/16",
    "vit-l16": "ViT-L/16",
    "vit-h16": "ViT-H/16",
    "vit-s8": "ViT-S/8",
    "vit-b8": "ViT-B/8",
    "resnet50": "ResNet-50",
    "resnet-tiny": "ResNet-Tiny (smoke)",
}
