"""ADE20K (ADEChallengeData2016) images and semantic maps (the MIT Scene Parsing Benchmark release).

Layout::

    ADEChallengeData2016/images/{training,validation}/*.jpg
    ADEChallengeData2016/annotations/{training,validation}/*.png    # uint8: 0 = other, 1..150 classes

The root may point at ``ADEChallengeData2016`` itself or at its parent, since both conventions are common
(mmseg's ``data/ade/ADEChallengeData2016`` vs Patch-Seg's ``ade20k/``). Labels are returned unchanged:
Patch-Seg keeps 0 as a class (151 classes) while mmseg/Segmenter drop it with ``reduce_zero_label``
(150 classes); that choice belongs to the protocol, not to the reader.
"""

from __future__ import annotations

from pathlib import Path

from densessl.data.coco import PairedSegmentationFolder
from densessl.errors import DataError

ADE_DIRNAME = "ADEChallengeData2016"
ADE_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
ADE_NUM_CLASSES = 150  # excluding 0 = other (reduce_zero_label protocols)
ADE_NUM_CLASSES_WITH_OTHER = 151  # Patch-Seg


def resolve_ade_root(root: str | Path) -> Path:
    """Return the ``ADEChallengeData2016`` folder given it or its parent."""
    root = Path(root)
    if (root / ADE_DIRNAME).is_dir():
        return root / ADE_DIRNAME
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return root
    raise DataError(f"{root}: neither {root / ADE_DIRNAME} nor {root}/images + {root}/annotations exist; "
                    f"point the ADE20K data root at ADEChallengeData2016 or at the folder that contains it")


class ADE20KSegmentation(PairedSegmentationFolder):
    """One ADE20K split; items are (PIL RGB image, uint8 (H, W) labels with 0 = other, 1..150)."""

    num_classes = ADE_NUM_CLASSES_WITH_OTHER

    def __init__(self, root: str | Path, split: str = "train", max_items: int | None = None) -> None:
        if split not in ADE_SPLITS:
            raise DataError(f"ADE20K split {split!r} unknown; expected one of {sorted(ADE_SPLITS)}")
        base = resolve_ade_root(root)
        folder = ADE_SPLITS[split]
        self.root = base
        self.split = folder
        super().__init__(base / "images" / folder, base / "annotations" / folder, max_items,
                         fix_hint=(f"expected {base}/images/{folder}/*.jpg and {base}/annotations/{folder}/*.png "
                                   f"(the ADEChallengeData2016 release)"))
