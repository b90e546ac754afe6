"""Dataset-specific preparation after extraction: the work that turns official archives into the layouts our
readers and the toolkits read.

* ``coco``: COCO-Stuff maps (``stuffthingmaps_trainval2017``) extracted into ``annotations/{train2017,val2017}``
  next to ``images/{train2017,val2017}`` (the Patch-Seg layout, iancovert/patch-seg ``CocoPatchDataset``; also
  mmseg's ``coco_stuff164k`` before its converter). Preparation pairs every image with its map and decodes every
  map to check it is single-channel with ids 0..181 or 255 (COCO-Stuff README "Caffe-compatible stuff-thing maps").
* ``ade20k``: ``ADEChallengeData2016`` as mmseg reads it; every map is decoded and checked for ids 0..150.
* ``cityscapes``: ``*_gtFine_labelTrainIds.png`` and ``*_gtFine_instanceTrainIds.png`` drawn from the polygons
  by cityscapesscripts' ``createLabelImage`` / ``createInstanceImage`` with the trainIds encoding (what its
  ``createTrainIdLabelImgs`` and ``createTrainIdInstanceImgs`` scripts write), for train and val.
* ``imagenet``: the per-class tars inside ``ILSVRC2012_img_train.tar`` expanded into ``train/<wnid>/``; the flat
  validation images sorted into ``val/<wnid>/`` with the devkit's ground truth and ``meta.mat`` (the mapping
  torchvision's ``datasets.imagenet.parse_val_archive`` applies).
* ``imagenet21k``: ``winter21_whole/<wnid>.tar`` expanded into ``train/<wnid>/``.

Each step skips work already done, so a rerun continues where an interrupted one stopped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.data.extract import extract
from densessl.errors import DataError
from densessl.progress import Progress

COCO_STUFF_MAX_ID = 181
ADE_MAX_ID = 150
UNLABELLED = 255


def _pairs(images: Path, maps: Path, image_suffix: str) -> list[tuple[Path, Path]]:
    imgs = {p.stem: p for p in images.glob(f"*{image_suffix}")}
    anns = {p.stem: p for p in maps.glob("*.png")}
    missing = sorted(set(imgs) - set(anns))
    extra = sorted(set(anns) - set(imgs))
    if missing or extra:
        raise DataError(f"{maps}: {len(missing)} image(s) without a map (e.g. {missing[:3]}) and {len(extra)} map(s) "
                        f"without an image (e.g. {extra[:3]}) against {images}; download and extract both archives "
                        f"again")
    return [(imgs[k], anns[k]) for k in sorted(imgs)]


def check_label_maps(pairs: list[tuple[Path, Path]], max_id: int, allow_void: bool, what: str,
                     interval: float | None = None) -> int:
    """Decode every map: single channel (``L`` or ``P``), same size as its image, ids within range."""
    progress = Progress(f"check {what}", len(pairs), unit="", interval=interval)
    for image_path, map_path in pairs:
        with Image.open(map_path) as m:
            if m.mode not in ("L", "P"):
                raise DataError(f"{map_path}: label map has mode {m.mode!r}, expected a single-channel (L or P) PNG; "
                                f"this is not the official release's map")
            labels = np.asarray(m)
            map_size = m.size
        with Image.open(image_path) as im:
            if im.size != map_size:
                raise DataError(f"{map_path}: map is {map_size} but its image {image_path.name} is {im.size}")
        top = int(labels.max()) if labels.size else 0
        if top > max_id and not (allow_void and top == UNLABELLED and labels[labels != UNLABELLED].max(initial=0)
                                 <= max_id):
            raise DataError(f"{map_path}: label id {top} is outside 0..{max_id}"
                            f"{' (or 255 = unlabelled)' if allow_void else ''}; the file is not the official map")
        progress.update(1)
    progress.finish()
    return len(pairs)


def prepare_coco(root: Path, interval: float | None = None) -> dict[str, int]:
    out = {}
    for split in ("train2017", "val2017"):
        pairs = _pairs(root / "images" / split, root / "annotations" / split, ".jpg")
        out[split] = check_label_maps(pairs, COCO_STUFF_MAX_ID, True, f"COCO-Stuff {split} maps", interval)
    return out


def prepare_ade20k(root: Path, interval: float | None = None) -> dict[str, int]:
    base = root / "ADEChallengeData2016"
    out = {}
    for split in ("training", "validation"):
        pairs = _pairs(base / "images" / split, base / "annotations" / split, ".jpg")
        out[split] = check_label_maps(pairs, ADE_MAX_ID, False, f"ADE20K {split} maps", interval)
    return out


def _cityscapes_maps(polygons: Path) -> dict[str, Image.Image]:
    """trainIds label and instance images of one ``*_gtFine_polygons.json``, drawn by cityscapesscripts.

    Its ``json2instanceImg`` saves a 32-bit ("I") image as PNG, which Pillow 11+ refuses to write, so the image
    is drawn with its ``createInstanceImage`` and stored as the 16-bit PNG the official ``*_instanceIds.png``
    files use (ids are at most 33 * 1000 + instances, below 65,536)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    annotation = Annotation()
    annotation.fromJsonFile(str(polygons))
    instances = np.asarray(createInstanceImage(annotation, "trainIds"), dtype=np.int64)
    if instances.max(initial=0) >= 1 << 16:
        raise DataError(f"{polygons}: an instance id {int(instances.max())} does not fit a 16-bit PNG")
    return {"_labelTrainIds.png": createLabelImage(annotation, "trainIds"),
            "_instanceTrainIds.png": Image.fromarray(instances.astype(np.uint16))}


def prepare_cityscapes(root: Path, interval: float | None = None) -> dict[str, int]:
    polygons = sorted(p for split in ("train", "val") for p in (root / "gtFine" / split).glob("*/*_gtFine_polygons.json"))
    if not polygons:
        raise DataError(f"{root}/gtFine: no */*_gtFine_polygons.json under train/ or val/; extract "
                        f"gtFine_trainvaltest.zip into {root}")
    progress = Progress("cityscapes trainIds label and instance maps", len(polygons), unit="", interval=interval)
    for f in polygons:
        targets = {s: f.with_name(f.name.replace("_polygons.json", s))
                   for s in ("_labelTrainIds.png", "_instanceTrainIds.png")}
        if not all(t.is_file() for t in targets.values()):
            for suffix, image in _cityscapes_maps(f).items():
                tmp = targets[suffix].with_name(targets[suffix].name + ".tmp.png")
                image.save(tmp)
                os.replace(tmp, targets[suffix])
        progress.update(1)
    progress.finish()
    return {"polygons": len(polygons)}


def expand_class_tars(folder: Path, what: str, interval: float | None = None) -> int:
    """``folder/<wnid>.tar`` → ``folder/<wnid>/``; each tar is removed once its folder is complete."""
    tars = sorted(folder.glob("*.tar"))
    progress = Progress(f"expand {what} class archives", len(tars), unit="", interval=interval)
    for tar in tars:
        partial = folder / f".{tar.stem}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        extract(tar, partial, "tar", interval=float("inf"))
        dest = folder / tar.stem
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)
        tar.unlink()  # an extraction product of the verified outer archive, not a user file
        progress.update(1)
    progress.finish()
    return len(tars)


def _val_wnids(devkit_root: Path) -> list[str]:
    import scipy.io

    found = list(devkit_root.glob("**/data/meta.mat"))
    if not found:
        raise DataError(f"{devkit_root}: no ILSVRC2012_devkit_t12/data/meta.mat; the devkit archive is incomplete")
    data = found[0].parent
    synsets = scipy.io.loadmat(str(data / "meta.mat"), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    truth = (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return [id_to_wnid[int(i)] for i in truth]


def prepare_imagenet(root: Path, interval: float | None = None) -> dict[str, int]:
    out = {"train_classes": expand_class_tars(root / "train", "ImageNet train", interval)}
    val = root / "val"
    flat = sorted(p for p in val.glob("*.JPEG") if p.is_file())
    if flat:
        wnids = _val_wnids(root / ".densessl-work" / "devkit")
        # the ground truth is in the order of the sorted file names (ILSVRC2012_val_00000001.JPEG, ...)
        index = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": w for i, w in enumerate(wnids)}
        progress = Progress("sort ImageNet val images into class folders", len(flat), unit="", interval=interval)
        for p in flat:
            if p.name not in index:
                raise DataError(f"{p}: not an ILSVRC2012 validation image name; expected ILSVRC2012_val_<8 digits>.JPEG")
            (val / index[p.name]).mkdir(exist_ok=True)
            os.replace(p, val / index[p.name] / p.name)
            progress.update(1)
        progress.finish()
    out["val_sorted"] = len(flat)
    return out


def prepare_imagenet21k(root: Path, interval: float | None = None) -> dict[str, int]:
    whole = root / "winter21_whole"
    train = root / "train"
    if whole.is_dir() and not train.exists():
        os.replace(whole, train)
    return {"classes": expand_class_tars(train, "ImageNet-21k", interval)}


def link_coco_images(lvis_root: Path, coco_root: Path) -> dict[str, int]:
    """LVIS v1 annotates COCO 2017 images: link ``<lvis>/{train2017,val2017}`` to the prepared COCO root's
    ``images/{train2017,val2017}`` (the layout mmdet's ``LVISV1Dataset`` and detectron2 read: the file is the
    ``coco_url`` path, and LVIS val images come from COCO train2017 too), then check that every image the two
    json files name is there."""
    import json

    for split in ("train2017", "val2017"):
        source = coco_root / "images" / split
        if not source.is_dir():
            raise DataError(f"{source}: not found; prepare COCO first (python -m densessl download --dataset coco "
                            f"--root {coco_root}) or give the COCO root that holds images/{split}")
        link = lvis_root / split
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    out = {}
    for name in ("lvis_v1_train.json", "lvis_v1_val.json"):
        images = json.loads((lvis_root / name).read_text(encoding="utf-8"))["images"]
        rel = [im["coco_url"].split("images.cocodataset.org/", 1)[-1] for im in images]
        missing = [r for r in rel if not (lvis_root / r).is_file()]
        if missing:
            raise DataError(f"{lvis_root / name}: {len(missing)} of its {len(rel)} images are not under {lvis_root} "
                            f"(e.g. {missing[:3]}); the COCO root {coco_root} is incomplete")
        out[name] = len(rel)
    return out


PREPARERS = {
    "extract": lambda root, interval=None: {},
    "coco": prepare_coco,
    "ade20k": prepare_ade20k,
    "cityscapes": prepare_cityscapes,
    "imagenet": prepare_imagenet,
    "imagenet21k": prepare_imagenet21k,
}
