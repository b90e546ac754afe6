"""Real datasets: the preparation of each layout from its official archives (Cityscapes with cityscapesscripts,
ImageNet-1k and -21k class archives, VOC, LVIS on COCO images, an already extracted copy). The archives are
built from the synthetic data (tests/dataset_archives.py); nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile

import numpy as np
import pytest
from dataset_archives import (
    guard_loopback,
    imagenet_archives,
    make_synthetic,
    official_archives,
    override_counts,
    override_for,
    serve,
    serving,
    tar_of,
    voc_tar,
    zip_of,
)
from PIL import Image

from densessl.data.acquire import ensure_dataset
from densessl.data.catalog import load_catalog
from densessl.data.synthetic import synthesize
from densessl.errors import DataError


@pytest.fixture
def server():
    with serving() as served:
        yield served


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    guard_loopback(monkeypatch)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"))


def test_a_placed_manual_dataset_is_verified_and_prepared_with_cityscapesscripts(synthetic, tmp_path):
    archives = official_archives("cityscapes", synthetic["cityscapes"])
    root = tmp_path / "cityscapes"
    (root / ".densessl-downloads").mkdir(parents=True)
    for name, data in archives.items():
        (root / ".densessl-downloads" / name).write_bytes(data)
    ensure_dataset("cityscapes", root, catalog=load_catalog(override_for("cityscapes", archives)))
    inst = sorted((root / "gtFine" / "train").glob("*/*_gtFine_instanceTrainIds.png"))
    assert len(inst) == 4
    ids = np.asarray(Image.open(inst[0]))
    labels = np.asarray(Image.open(str(inst[0]).replace("instanceTrainIds", "labelTrainIds")))
    # instance pixels carry trainId * 1000 + k, and agree with the semantic trainIds map
    things = ids >= 1000
    assert things.any() and (ids[things] // 1000 == labels[things]).all()


def test_placed_imagenet_archives_are_expanded_and_val_sorted_into_class_folders(tmp_path):
    syn = tmp_path / "syn"
    synthesize("imagenet", syn, "tiny", 0)
    archives = imagenet_archives(syn, tmp_path / "devkit-src")
    root = tmp_path / "imagenet"
    for name, data in archives.items():  # placed directly in the root, as users often do
        root.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    override = override_counts("imagenet", archives, {"train": 16, "val": 8})
    ensure_dataset("imagenet", root, catalog=load_catalog(override))
    expected = sorted(p.relative_to(syn).as_posix() for p in (syn / "train").glob("*/*.JPEG"))
    assert sorted(p.relative_to(root).as_posix() for p in (root / "train").glob("*/*.JPEG")) == expected
    assert not list((root / "train").glob("*.tar"))
    # every validation image lands in the folder of its class, with the same bytes
    for p in sorted((syn / "val").glob("*/*.JPEG")):
        matches = [q for q in (root / "val" / p.parent.name).iterdir() if q.read_bytes() == p.read_bytes()]
        assert len(matches) == 1


def test_imagenet21k_class_archives_are_expanded_into_train(tmp_path):
    syn = tmp_path / "syn"
    synthesize("imagenet", syn, "tiny", 0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as outer:
        for d in sorted((syn / "train").iterdir()):
            inner = tar_of(d, "", list(d.iterdir()), gz=False)
            info = tarfile.TarInfo(f"winter21_whole/{d.name}.tar")
            info.size = len(inner)
            outer.addfile(info, io.BytesIO(inner))
    archives = {"winter21_whole.tar.gz": buf.getvalue()}
    root = tmp_path / "in21k"
    (root / ".densessl-downloads").mkdir(parents=True)
    (root / ".densessl-downloads" / "winter21_whole.tar.gz").write_bytes(archives["winter21_whole.tar.gz"])
    classes = len(list((syn / "train").iterdir()))
    ensure_dataset("imagenet21k", root, catalog=load_catalog(override_counts("imagenet21k", archives,
                                                                              {"train": classes})))
    assert sorted(p.relative_to(root / "train").as_posix() for p in (root / "train").glob("*/*.JPEG")) == sorted(
        p.relative_to(syn / "train").as_posix() for p in (syn / "train").glob("*/*.JPEG"))


def test_an_extracted_copy_without_archives_is_counted_not_downloaded(server, synthetic, tmp_path):
    handler, base = server
    root = tmp_path / "ade"
    shutil.copytree(synthetic["ade20k"], root)
    archives = official_archives("ade20k", synthetic["ade20k"])
    marker = ensure_dataset("ade20k", root, mirror=base, catalog=load_catalog(override_for("ade20k", archives)))
    assert marker["archives_verified"] is False and marker["counts"]["validation"] == 6
    assert handler.requests == []


def test_voc_tars_checked_by_their_published_md5_merge_into_vocdevkit(server, synthetic, tmp_path):
    handler, base = server
    jpgs = sorted((synthetic["coco"] / "images" / "train2017").glob("*.jpg"))
    archives = {"VOCtrainval_06-Nov-2007.tar": voc_tar(jpgs[:3], "2007", "trainval"),
                "VOCtest_06-Nov-2007.tar": voc_tar(jpgs[3:5], "2007", "test"),
                "VOCtrainval_11-May-2012.tar": voc_tar(jpgs[5:], "2012", "trainval")}
    serve(handler, "voc", archives)
    override = {"voc": {"files": [{"name": n, "size": len(b), "md5": hashlib.md5(b).hexdigest()}
                                  for n, b in archives.items()],
                        "counts": [{"split": "2007-trainval", "expected": 3}, {"split": "2007-test", "expected": 2},
                                   {"split": "2012-trainval", "expected": len(jpgs) - 5}]}}
    catalog = load_catalog(override)
    assert catalog["voc"].file("VOCtest_06-Nov-2007.tar").checksum[0] == "md5"
    marker = ensure_dataset("voc", tmp_path / "voc", mirror=base, catalog=catalog)
    assert {f["algorithm"] for f in marker["files"]} == {"md5"}
    assert len(list((tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages").iterdir())) == 5


def test_lvis_json_zips_and_links_to_the_coco_images(server, tmp_path):
    handler, base = server
    syn = tmp_path / "syn"
    synthesize("lvis", syn, "tiny", 0)
    archives = {f"{n}.zip": zip_of(syn, "", [syn / n]) for n in ("lvis_v1_train.json", "lvis_v1_val.json")}
    serve(handler, "lvis", archives)
    coco = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        shutil.copytree(syn / split, coco / "images" / split)
    override = override_counts("lvis", archives, {"train": 8, "val": 4})
    root = tmp_path / "lvis"
    marker = ensure_dataset("lvis", root, mirror=base, catalog=load_catalog(override), coco_root=coco)
    assert marker["counts"] == {"train": 8, "val": 4}
    assert (root / "train2017").resolve() == (coco / "images" / "train2017").resolve()
    # a COCO root missing an image the annotations name is refused
    victim = sorted((coco / "images" / "val2017").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"1 of its \d+ images are not under"):
        ensure_dataset("lvis", root, catalog=load_catalog(override), coco_root=coco)
