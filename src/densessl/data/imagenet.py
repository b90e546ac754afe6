"""ImageNet in ImageFolder layout (``<root>/<split>/<wnid>/*.JPEG``), as DINO reads it
(``torchvision.datasets.ImageFolder``). Self-supervised pretraining ignores the labels; the supervised reference
reads them (:class:`LabelledImageFolder`), or COCO's semantic maps for its patch target."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from densessl.data.coco import CocoStuffPatchSegDataset
from densessl.errors import DataError


class ImageFolderImages(Dataset):
    """Images of an ImageFolder split, returned as RGB PIL images (labels dropped)."""

    def __init__(self, root: str | Path, split: str = "train", max_items: int | None = None):
        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"{folder}: not found; expected an ImageNet-style folder '<root>/{split}/<class>/*.JPEG'"
                            f" (set data.roots.imagenet in config.yaml to the dataset root)")
        try:
            _, class_to_idx = find_classes(str(folder))
            samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise DataError(f"{folder}: {exc}") from exc
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        ordered = sorted(samples)
        self.paths = [Path(p) for p, _ in ordered]
        self.labels = [int(label) for _, label in ordered]
        if max_items is not None:
            self.paths, self.labels = self.paths[:max_items], self.labels[:max_items]
        if not self.paths:
            raise DataError(f"{folder}: no images found (extensions {IMG_EXTENSIONS})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from exc


class LabelledImageFolder(ImageFolderImages):
    """An ImageFolder split with its labels: class index = position of the class folder in sorted order, the
    order ``torchvision.datasets.ImageFolder`` uses and that DINO's ``eval_knn.py`` / ``eval_linear.py`` read
    (``dataset.samples``). ``max_items`` keeps every ``k``-th image so a cut split keeps every class."""

    def __init__(self, root: str | Path, split: str = "train", max_items: int | None = None):
        super().__init__(root, split)
        folder = Path(root) / split
        self.classes, class_to_idx = find_classes(str(folder))
        self.labels = [class_to_idx[p.parent.name] for p in self.paths]
        if max_items is not None and max_items < len(self.paths):
            keep = [round(i * len(self.paths) / max_items) for i in range(max_items)]
            self.paths = [self.paths[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageLabelPairs(LabelledImageFolder):
    """(image, ImageFolder class index) pairs: what the supervised reference trains on."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:  # type: ignore[override]
        return super().__getitem__(index), self.labels[index]


class FlatImageFolder(Dataset):
    """Every image directly inside one folder (COCO ``images/train2017``, ADE20K ``images/training``): what
    GTSA pretrains on (``--data <COCO train2017 or ADE20K train>``, bok3948/GTSA README and
    ``util/datasets.py``)."""

    def __init__(self, folder: str | Path, max_items: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder not found (check data.roots in config.yaml)")
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if max_items is not None:
            self.paths = self.paths[:max_items]
        if not self.paths:
            raise DataError(f"{folder}: no images found (extensions {IMG_EXTENSIONS})")

    def __len__(self) -> int:
        return len(self.paths)

    __getitem__ = ImageFolderImages.__getitem__


def pretraining_images(dataset: str, root: str | Path, max_items: int | None = None,
                       labels: str | None = None) -> Dataset:
    """The training images of ``dataset`` in its real layout. ``labels="image"``: (image, class index) pairs,
    which only ImageNet has; ``labels="patch"``: (image, label map) pairs from the COCO train split's COCO-Stuff
    maps (things + stuff, shifted to Patch-Seg's 183 classes), which only COCO has here. Both are for the
    supervised reference; the validation split is never read."""
    root = Path(root)
    if labels == "image":
        if dataset != "imagenet":
            raise DataError(f"supervised training on {dataset!r}: only imagenet has image-level labels; set "
                            f"data: imagenet for the supervised reference with target: image")
        return ImageLabelPairs(root, "train", max_items=max_items)
    if labels == "patch":
        if dataset != "coco":
            raise DataError(f"supervised training on {dataset!r}: only coco has the label maps of the patch target; "
                            f"set data: coco for the supervised reference with target: patch")
        return CocoStuffPatchSegDataset(root, "train", max_items=max_items)
    if labels is not None:
        raise DataError(f"pretraining labels {labels!r}: expected None, 'image' or 'patch'")
    if dataset == "imagenet":
        return ImageFolderImages(root, "train", max_items=max_items)
    if dataset == "coco":
        return FlatImageFolder(root / "images" / "train2017", max_items=max_items)
    if dataset == "ade20k":
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        return FlatImageFolder(base / "images" / "training", max_items=max_items)
    raise DataError(f"pretraining on {dataset!r} is not supported; use imagenet, coco or ade20k")
