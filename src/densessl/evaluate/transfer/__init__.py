"""Transfer protocols run through external toolkits (mmsegmentation, mmdetection, torchvision detection)."""
