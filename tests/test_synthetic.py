"""Synthetic datasets: real layouts, exact labels, determinism, and colour that does not give the class away."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from densessl.data.synthetic import (
    DATASETS,
    MARKER,
    SynthSize,
    ade20k,
    cityscapes,
    coco,
    davis,
    imagenet,
    inat,
    lvis,
    scenes,
    synthesize,
    voc,
)
from densessl.errors import DataError

TINY = SynthSize.preset("tiny")
# pycocotools calls np.array(copy=False) on its own objects (numpy 2 deprecation; not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for d in DATASETS:
        synthesize(d, root / d, "tiny", seed=0)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ------------------------------------------------------------------------------------------ general


def test_writer_indices_match_dataset_order() -> None:
    modules = (imagenet, coco, ade20k, davis, inat, lvis, cityscapes, voc)
    assert [m.DATASET_INDEX for m in modules] == list(range(len(DATASETS)))


@pytest.mark.parametrize("dataset", DATASETS)
def test_deterministic_and_seed_dependent(tiny_root: Path, tmp_path: Path, dataset: str) -> None:
    synthesize(dataset, tmp_path / "same", "tiny", seed=0)
    synthesize(dataset, tmp_path / "other", "tiny", seed=1)
    ref = _digests(tiny_root / dataset)
    assert MARKER in ref
    assert _digests(tmp_path / "same") == ref
    other = _digests(tmp_path / "other")
    images = [k for k in ref if k.endswith((".jpg", ".JPEG", "_leftImg8bit.png"))]
    assert images
    # file names may depend on the seed (iNat hashes); the image contents must
    assert not {ref[k] for k in images} & set(other.values())


def test_skip_overwrite_and_refuse(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    first = synthesize("coco", root, "tiny", seed=0)
    marker = root / MARKER
    stamp = marker.stat().st_mtime_ns
    assert synthesize("coco", root, "tiny", seed=0) == first
    assert marker.stat().st_mtime_ns == stamp  # skipped: complete and identical
    second = synthesize("coco", root, "tiny", seed=3)
    assert second["seed"] == 3 and json.loads(marker.read_text())["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="refusing"):
        synthesize("coco", real, "tiny")
    with pytest.raises(DataError, match="unknown"):
        synthesize("imagenet22k", tmp_path / "x", "tiny")
    with pytest.raises(DataError, match="unknown preset"):
        synthesize("coco", tmp_path / "x", "huge")


def test_summary_counts(tiny_root: Path) -> None:
    for d in DATASETS:
        summary = json.loads((tiny_root / d / MARKER).read_text())
        assert summary["splits"] == dict(TINY.counts[d])
        assert summary["image_hw"] == list(TINY.image_hw[d])


# ------------------------------------------------------------------------------------------ geometry


def test_mask_to_polygons_roundtrip_with_holes() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :50]
    ring = (np.hypot(yy - 20, xx - 25) < 15) & (np.hypot(yy - 20, xx - 25) > 6)
    masks = [ring, ring | (np.hypot(yy - 20, xx - 25) < 3)]  # an island inside the hole
    masks += [(rng.random((40, 50)) < 0.5) | ring for _ in range(3)]  # many components, saddles, holes
    for m in masks:
        polys = scenes.mask_to_polygons(m)
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 40, 50))).astype(bool)
        assert np.array_equal(decoded, m)


# ------------------------------------------------------------------------------------------ scene content


def _render_many(n: int = 240) -> list[scenes.Scene]:
    return [coco.render(0, 0, i, (80, 96)) for i in range(n)]


@pytest.fixture(scope="module")
def many_scenes() -> list[scenes.Scene]:
    return _render_many()


def test_thing_coverage(many_scenes: list[scenes.Scene]) -> None:
    cover = np.mean([(s.instance > 0).mean() for s in many_scenes])
    assert cover >= 0.3, cover
    counts = [len(s.things) for s in many_scenes]
    assert min(counts) >= 1 and max(counts) <= 4
    radii = np.array([t.pose.radius for s in many_scenes for t in s.things]) / 80
    assert radii.min() < 0.2 and radii.max() > 0.4  # scale variation


def test_colour_does_not_identify_the_class(many_scenes: list[scenes.Scene]) -> None:
    feats, labels = [], []
    for s in many_scenes:
        img = s.image.reshape(-1, 3).astype(float)
        for i, t in enumerate(s.things):
            m = s.visible(i).ravel()
            if m.sum() >= 20:
                feats.append(img[m].mean(0))
                labels.append(t.cls)
        for k, c in enumerate(s.region_classes):
            m = (s.regions == k).ravel() & (s.instance.ravel() == 0)
            if m.sum() >= 20:
                feats.append(img[m].mean(0))
                labels.append(c)
    x, y = np.array(feats), np.array(labels)
    class_means = []
    for c in range(scenes.NUM_CLASSES):
        xc = x[y == c]
        assert len(xc) >= 10, c
        # instance colours vary widely within a class (a region mean blends its two colours: ~32 per channel)
        assert xc.std(0).mean() > 25, (c, xc.std(0))
        class_means.append(xc.mean(0))
    class_means = np.array(class_means)
    assert np.abs(class_means - class_means.mean(0)).max() < 30, class_means  # no class has "its" colour
    # a nearest-class-mean colour classifier (fit on one half, tested on the other) is near chance
    half = len(x) // 2
    means = np.array([x[:half][y[:half] == c].mean(0) for c in range(scenes.NUM_CLASSES)])
    pred = np.argmin(((x[half:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == y[half:]).mean() < 0.2


def test_colour_pairs_contrast_mostly_in_luminance() -> None:
    rng = np.random.default_rng(0)
    pairs = scenes.random_colors(rng, 2000, min_dist=90.0)
    assert pairs.shape == (2000, 2, 3) and pairs.min() >= 0 and pairs.max() <= 255
    # value (max channel) of the two colours differs by at least min_dist / 255 of the range
    value_gap = np.abs(pairs[:, 0].max(-1) - pairs[:, 1].max(-1))
    assert value_gap.min() >= 90.0 - 1e-6
    # luminance (BT.601) differences dominate the chroma differences within a pair, as in natural images
    weights = np.array([0.299, 0.587, 0.114])
    luma = pairs @ weights
    chroma = pairs - luma[..., None]
    d_luma = np.abs(luma[:, 0] - luma[:, 1])
    d_chroma = np.linalg.norm(chroma[:, 0] - chroma[:, 1], axis=-1)
    assert np.median(d_luma) > 2 * np.median(d_chroma)
    # hues are spread around the whole circle: no hue family is preferred
    hue = np.arctan2(chroma[:, 0] @ np.array([0.0, 1.0, -1.0]), chroma[:, 0] @ np.array([2.0, -1.0, -1.0]))
    counts, _ = np.histogram(hue, bins=6, range=(-np.pi, np.pi))
    assert counts.min() > 0.5 * counts.mean(), counts


def test_labels_come_from_the_rasterisation(many_scenes: list[scenes.Scene]) -> None:
    for s in many_scenes[:50]:
        things = s.instance > 0
        assert np.all(s.semantic[things] < scenes.NUM_THINGS)
        for i, t in enumerate(s.things):
            vis = s.visible(i)
            assert np.all(s.semantic[vis] == t.cls)
            assert t.amodal is not None and np.all(t.amodal[vis])
        stuff = ~things & (s.semantic != scenes.UNLABELLED)
        assert np.all(np.array(s.region_classes)[s.regions[stuff]] == s.semantic[stuff])


# ------------------------------------------------------------------------------------------ layouts


def test_imagenet_layout(tiny_root: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = tiny_root / "imagenet"
    train = ImageFolder(str(root / "train"))
    val = ImageFolder(str(root / "val"))
    assert train.classes == list(imagenet.WNIDS) == val.classes
    assert len(train) == TINY.counts["imagenet"]["train"] and len(val) == TINY.counts["imagenet"]["val"]
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in imagenet.WNIDS)
    for path, _ in val.samples:
        assert Path(path).name.startswith("ILSVRC2012_val_") and Path(path).suffix == ".JPEG"
    for path, label in train.samples:
        assert Path(path).name.startswith(imagenet.WNIDS[label] + "_")
    img = Image.open(train.samples[0][0])
    assert img.format == "JPEG" and img.size == TINY.image_hw["imagenet"][::-1]


def test_coco_instances_and_stuff_maps(tiny_root: Path) -> None:
    root = tiny_root / "coco"
    h, w = TINY.image_hw["coco"]
    n_crowd = 0
    for split_index, (split, folder) in enumerate(coco.SPLITS.items()):
        api = COCO(str(root / "annotations" / f"instances_{folder}.json"))
        doc = json.loads((root / "annotations" / f"instances_{folder}.json").read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations", "categories"}
        cat_ids = sorted(api.getCatIds())
        assert cat_ids == list(coco.THING_CATEGORY_IDS) and cat_ids != list(range(1, len(cat_ids) + 1))
        images = sorted(p.name for p in (root / "images" / folder).iterdir())
        maps = sorted(p.name for p in (root / "annotations" / folder).iterdir())
        assert [p[:-4] for p in images] == [p[:-4] for p in maps] and len(images) == TINY.counts["coco"][
            split
        ]
        assert images == sorted(img["file_name"] for img in doc["images"])
        assert all(len(p) == len("000000000000.jpg") for p in images)
        for index in range(TINY.counts["coco"][split]):
            img_id = coco.image_id(split_index, index)
            scene = coco.render(0, split_index, index, (h, w))
            stuff = np.array(Image.open(root / "annotations" / folder / f"{img_id:012d}.png"))
            assert stuff.dtype == np.uint8 and stuff.shape == (h, w)
            assert set(np.unique(stuff)) <= set(range(182)) | {255}
            anns = api.loadAnns(api.getAnnIds(imgIds=[img_id]))
            visible = [i for i in range(len(scene.things)) if scene.visible(i).any()]
            assert len(anns) == len(visible)
            for ann, i in zip(anns, visible):
                m = api.annToMask(ann).astype(bool)
                assert _iou(m, scene.visible(i)) > 0.99
                assert ann["area"] == m.sum() and ann["category_id"] - 1 == stuff[m][0]
                assert np.all(stuff[m] == ann["category_id"] - 1)
                x, y, bw, bh = ann["bbox"]
                assert m[int(y) : int(y + bh), int(x) : int(x + bw)].sum() == m.sum()
                if ann["iscrowd"]:
                    assert isinstance(ann["segmentation"]["counts"], str)
                    assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), m)
                    n_crowd += 1
                else:
                    assert isinstance(ann["segmentation"], list)
    assert n_crowd > 0


def test_coco_stuff_maps_have_stuff_and_unlabelled(tiny_root: Path) -> None:
    values = np.concatenate(
        [np.array(Image.open(p)).ravel() for p in (tiny_root / "coco" / "annotations").glob("*2017/*.png")]
    )
    assert 255 in values
    assert set(coco.STUFF_MAP_IDS) & set(values.tolist())
    assert all(91 <= s <= 181 for s in coco.STUFF_MAP_IDS)
    assert ((values < 91) & (values >= 0)).mean() > 0.2  # things


def test_ade20k_layout(tiny_root: Path) -> None:
    base = tiny_root / "ade20k" / "ADEChallengeData2016"
    values = []
    for split, folder in ade20k.SPLITS.items():
        imgs = sorted((base / "images" / folder).glob("*.jpg"))
        anns = sorted((base / "annotations" / folder).glob("*.png"))
        assert len(imgs) == len(anns) == TINY.counts["ade20k"][split]
        assert [p.stem for p in imgs] == [p.stem for p in anns]
        assert imgs[0].name == f"{ade20k.PREFIX[split]}_00000001.jpg"
        for p in anns:
            a = Image.open(p)
            assert a.mode == "L" and a.size == TINY.image_hw["ade20k"][::-1]
            values.append(np.array(a).ravel())
    v = np.concatenate(values)
    assert v.max() <= 150 and 0 in v
    assert set(np.unique(v)) <= {0, *ade20k.THING_IDS, *ade20k.STUFF_IDS}
    assert len((base / "objectInfo150.csv").read_text().splitlines()) == 151


def test_davis_layout_and_motion(tiny_root: Path) -> None:
    root = tiny_root / "davis"
    frames = TINY.davis_frames
    pal = davis.palette()
    assert pal[3:6] == [128, 0, 0] and pal[6:9] == [0, 128, 0]  # VOC colour map
    for split in ("train", "val"):
        seqs = (root / "ImageSets" / "2017" / f"{split}.txt").read_text().split()
        assert len(seqs) == TINY.counts["davis"][split]
        for seq in seqs:
            jpgs = sorted((root / "JPEGImages" / "480p" / seq).glob("*.jpg"))
            pngs = sorted((root / "Annotations" / "480p" / seq).glob("*.png"))
            assert [p.name for p in jpgs] == [f"{i:05d}.jpg" for i in range(frames)]
            assert [p.stem for p in pngs] == [p.stem for p in jpgs]
            anns = []
            for p in pngs:
                a = Image.open(p)
                assert a.mode == "P" and a.getpalette()[:9] == pal[:9]
                anns.append(np.array(a))
            ids = np.unique(anns[0])
            n = int(ids.max())
            assert n >= 2 and list(ids) == list(range(n + 1))  # all objects visible in the first frame
            first, last = anns[0], anns[-1]
            moved = 0
            for k in range(1, n + 1):
                if (last == k).sum() == 0:
                    continue
                c0 = np.argwhere(first == k).mean(0)
                c1 = np.argwhere(last == k).mean(0)
                moved += np.hypot(*(c1 - c0)) > 2.0
            assert moved >= 1
            assert Image.open(jpgs[0]).size == TINY.image_hw["davis"][::-1]


def test_davis_objects_not_separable_by_colour() -> None:
    clip = davis.render(0, 1, 0, (72, 128), 6)
    f = clip[0]
    img = f.image.reshape(-1, 3).astype(float)
    means = [img[(f.objects == k).ravel()].mean(0) for k in range(1, int(f.objects.max()) + 1)]
    bg = img[(f.objects == 0).ravel()].mean(0)
    # the objects share the clip's colours: their mean colours are close to each other
    spread = max(np.abs(a - b).max() for a in means for b in means)
    assert spread < 80, (means, bg)


def test_inat_layout(tiny_root: Path) -> None:
    root = tiny_root / "inat"
    for split, name in inat.SPLITS.items():
        doc = json.loads((root / f"{name}.json").read_text())
        assert len(doc["images"]) == TINY.counts["inat"][split] == len(doc["annotations"])
        cats = {c["id"]: c for c in doc["categories"]}
        assert all(
            {"kingdom", "phylum", "class", "order", "family", "genus", "name"} <= set(c)
            for c in cats.values()
        )
        by_id = {img["id"]: img for img in doc["images"]}
        for ann in doc["annotations"]:
            fn = by_id[ann["image_id"]]["file_name"]
            assert (root / fn).is_file() and fn.startswith("train_val2019/")
            assert fn.split("/")[2] == str(ann["category_id"]) and ann["category_id"] in cats


def test_lvis_layout(tiny_root: Path) -> None:
    root = tiny_root / "lvis"
    for split in ("train", "val"):
        api = COCO(str(root / f"lvis_v1_{split}.json"))
        cats = api.loadCats(api.getCatIds())
        assert {"synset", "frequency", "image_count", "instance_count", "synonyms", "def"} <= set(cats[0])
        assert {c["frequency"] for c in cats} == {"f", "c", "r"}
        for img in api.loadImgs(api.getImgIds()):
            assert "neg_category_ids" in img and "not_exhaustive_category_ids" in img
            path = root / lvis.SPLITS[split] / img["coco_url"].rsplit("/", 1)[1]
            assert path.is_file()
            for ann in api.loadAnns(api.getAnnIds(imgIds=[img["id"]])):
                assert isinstance(ann["segmentation"], list)
                assert api.annToMask(ann).sum() == ann["area"] > 0


def test_cityscapes_layout(tiny_root: Path) -> None:
    root = tiny_root / "cityscapes"
    h, w = TINY.image_hw["cityscapes"]
    thing_ids = {lid for _, lid, _ in cityscapes.THING_LABELS}
    stuff_ids = {lid for _, lid, _ in cityscapes.STUFF_LABELS}
    n = 0
    for split in ("train", "val"):
        for img_path in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            n += 1
            city = img_path.parent.name
            assert city in cityscapes.CITIES[split] and img_path.name.startswith(city + "_")
            stem = img_path.name[: -len("_leftImg8bit.png")]
            gt = root / "gtFine" / split / city
            labels = np.array(Image.open(gt / f"{stem}_gtFine_labelIds.png"))
            inst = np.array(Image.open(gt / f"{stem}_gtFine_instanceIds.png")).astype(np.int64)
            color = Image.open(gt / f"{stem}_gtFine_color.png")
            assert Image.open(img_path).size == (w, h) and color.mode == "RGBA"
            assert set(np.unique(labels)) <= thing_ids | stuff_ids | {0}
            is_inst = inst >= 1000
            assert is_inst.any() and np.array_equal(inst[is_inst] // 1000, labels[is_inst])
            assert set(np.unique(labels[is_inst])) <= thing_ids
            assert np.array_equal(inst[~is_inst], labels[~is_inst])
            poly = json.loads((gt / f"{stem}_gtFine_polygons.json").read_text())
            assert poly["imgHeight"] == h and poly["imgWidth"] == w
            assert poly["objects"] and all({"label", "polygon"} <= set(o) for o in poly["objects"])
    assert n == sum(TINY.counts["cityscapes"].values())


def test_synthetic_counts_resize_one_dataset_only(tmp_path: Path) -> None:
    """``data.synthetic_counts`` replaces one dataset's split sizes; its data settings (the DAG's rerun trigger)
    change and no other dataset's do."""
    from densessl.config import load_config
    from densessl.data.synthetic import resized
    from densessl.stages.data import run_data

    size = resized("tiny", {"cityscapes": {"train": 6}})
    assert size.counts["cityscapes"] == {"train": 6, "val": 2} and size.counts["coco"] == SynthSize.preset(
        "tiny").counts["coco"]
    for bad, named in (({"citiscapes": {"train": 2}}, "data.synthetic_counts.citiscapes: unknown dataset"),
                       ({"cityscapes": {"test": 2}}, "data.synthetic_counts.cityscapes.test: unknown split"),
                       ({"cityscapes": {"train": 0}}, "data.synthetic_counts.cityscapes.train: 0;"),
                       ({"cityscapes": {"train": True}}, "data.synthetic_counts.cityscapes.train: True;")):
        with pytest.raises(DataError) as raised:
            resized("tiny", bad)
        assert str(raised.value).startswith(named), raised.value
    root = Path(__file__).resolve().parents[1]
    plain = load_config([], preset="smoke", overrides={"results_dir": str(tmp_path / "a"),
                                                       "data": {"synthetic_size": "tiny"}}, root=root)
    grown = load_config([], preset="smoke", overrides={"results_dir": str(tmp_path / "b"), "data": {
        "synthetic_size": "tiny", "synthetic_counts": {"cityscapes": {"train": 6}}}}, root=root)
    assert plain.data_settings("coco") == grown.data_settings("coco")
    assert plain.data_settings("cityscapes") != grown.data_settings("cityscapes")
    manifest = json.loads(run_data(grown, "cityscapes").read_text())
    assert manifest["summary"]["size"]["counts"] == {"train": 6, "val": 2}
