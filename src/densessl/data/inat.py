"""iNaturalist 2019 classification split reader (the FGVC6 competition release).

Layout (the FGVC6 release, as GTSA's ``iNat19_Dataset`` reads it from ``--data_path``)::

    <root>/train2019.json        COCO-style: "images", "annotations", "categories"
    <root>/val2019.json
    <root>/<file_name>           e.g. train_val2019/Plants/400/<hash>.jpg, as each image entry gives it

The label of an image is its annotation's ``category_id``, used directly as the class index (GTSA
``util/datasets.py``), so the category ids must be 0..C-1; C = ``len(categories)`` (1010 in the real files).

One deliberate difference from the official reader: GTSA pairs ``images[i]`` with ``annotations[i]`` by list
position (and asserts equal ids); we pair by ``annotation.image_id``, which gives the same pairs on the real
files (one annotation per image, same order) and fails with a clear message instead of mislabelling when a
file is reordered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from densessl.errors import DataError

INAT_SPLITS = {"train": "train2019.json", "val": "val2019.json"}
INAT19_NUM_CLASSES = 1010  # bok3948/GTSA iNat19_classification models_vit.py: 1010 classes, hard-coded


def _require(entry: Any, fields: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} is a {type(entry).__name__}, expected a JSON object; "
                        f"the file is not an iNat 2019 annotation file")
    for name in fields:
        if name not in entry:
            raise DataError(f"{path}: {where} has no field {name!r} (expected fields {list(fields)}); "
                            f"re-download {path.name} from the iNat 2019 release")


def load_split_json(path: Path) -> dict[str, Any]:
    """Read one annotation file and check its top-level fields."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; the iNat 2019 data root must contain "
                        f"{' and '.join(INAT_SPLITS.values())} (extract the FGVC6 annotation archive there)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-download or re-extract it") from exc
    _require(doc, ("images", "annotations", "categories"), "the top level", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc[key], list):
            raise DataError(f"{path}: field {key!r} is a {type(doc[key]).__name__}, expected a list")
    return doc


class INat2019:
    """One iNat 2019 split; items are ``(PIL RGB image, int label)`` in the file's image order.

    ``max_items`` keeps the first N images (smoke runs). ``num_classes`` is ``len(categories)``.
    """

    def __init__(self, root: str | Path, split: str = "train", max_items: int | None = None) -> None:
        if split not in INAT_SPLITS:
            raise DataError(f"iNat 2019 split {split!r} unknown; expected one of {sorted(INAT_SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.json_path = self.root / INAT_SPLITS[split]
        doc = load_split_json(self.json_path)
        path = self.json_path

        cat_ids = []
        for i, cat in enumerate(doc["categories"]):
            _require(cat, ("id",), f"categories[{i}]", path)
            cat_ids.append(cat["id"])
        self.num_classes = len(cat_ids)
        if self.num_classes == 0:
            raise DataError(f"{path}: field 'categories' is empty")
        if sorted(cat_ids) != list(range(self.num_classes)):
            raise DataError(f"{path}: category ids must be 0..{self.num_classes - 1} (they are used as class "
                            f"indices, as in GTSA's reader); found min {min(cat_ids)}, max {max(cat_ids)}, "
                            f"{len(set(cat_ids))} distinct")
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in doc["categories"]}

        label_of: dict[Any, int] = {}
        for i, ann in enumerate(doc["annotations"]):
            _require(ann, ("image_id", "category_id"), f"annotations[{i}]", path)
            cid = ann["category_id"]
            if not isinstance(cid, int) or not 0 <= cid < self.num_classes:
                raise DataError(f"{path}: annotations[{i}] has category_id {cid!r}, not one of the "
                                f"{self.num_classes} category ids")
            if ann["image_id"] in label_of:
                raise DataError(f"{path}: image_id {ann['image_id']!r} has more than one annotation "
                                f"(annotations[{i}]); iNat 2019 has exactly one label per image")
            label_of[ann["image_id"]] = cid

        images = doc["images"] if max_items is None else doc["images"][:max_items]
        self.files: list[str] = []
        self.labels: list[int] = []
        for i, img in enumerate(images):
            _require(img, ("id", "file_name"), f"images[{i}]", path)
            if img["id"] not in label_of:
                raise DataError(f"{path}: images[{i}] (id {img['id']!r}, {img['file_name']}) has no annotation")
            self.files.append(str(img["file_name"]))
            self.labels.append(label_of[img["id"]])
        if not self.files:
            raise DataError(f"{path}: field 'images' is empty")
        first = self.root / self.files[0]
        if not first.is_file():
            raise DataError(f"{first}: image not found (images[0].file_name of {path.name} is relative to "
                            f"{self.root}); extract the iNat 2019 image archive into the data root")

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path = self.path(index)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError as exc:
            raise DataError(f"{path}: image not found (listed in {self.json_path.name}); extract the iNat 2019 "
                            f"image archive into {self.root}") from exc
        except Exception as exc:  # PIL raises several types for truncated/corrupt files
            raise DataError(f"{path}: cannot read image ({exc}); re-download or re-extract the images") from exc
        return image, self.labels[index]
