"""max_test_images: the detection test split cut to its first N images, in files that the dataset and the
evaluator (which scores every image of its annotation file) read alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densessl.errors import ConfigError, DataError
from densessl.evaluate.transfer.mmdet_data_cfg import DatasetFiles
from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig
from densessl.evaluate.transfer.mmdet_test_subset import limit_test_split


def _coco(tmp_path: Path) -> DatasetFiles:
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (5, 1, 3, 2, 4)],
           "annotations": [{"id": 10 * i, "image_id": i, "category_id": 1} for i in (1, 2, 3, 4, 5, 5)],
           "categories": [{"id": 1, "name": "thing"}]}
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps(doc))
    return DatasetFiles("coco", tmp_path, ({"ann_file": "train.json"},), {"ann_file": str(ann), "x": 1}, ("thing",))


def test_coco_subset_keeps_the_first_images_and_their_annotations(tmp_path: Path) -> None:
    files = _coco(tmp_path)
    work = tmp_path / "work"
    cut = limit_test_split(files, 3, work)
    doc = json.loads(Path(cut.test["ann_file"]).read_text())
    assert [im["id"] for im in doc["images"]] == [1, 2, 3]
    assert sorted(a["image_id"] for a in doc["annotations"]) == [1, 2, 3]
    assert doc["categories"] == [{"id": 1, "name": "thing"}] and cut.test["x"] == 1
    assert Path(cut.test["ann_file"]).parent == work and cut.train == files.train


def test_none_is_the_whole_split(tmp_path: Path) -> None:
    files = _coco(tmp_path)
    assert limit_test_split(files, None, tmp_path / "work") is files


def test_voc_subset_is_the_first_lines_of_the_id_list(tmp_path: Path) -> None:
    ids = tmp_path / "test.txt"
    ids.write_text("000001\n000004\n\n000007\n")
    files = DatasetFiles("voc", tmp_path, (), {"ann_file": str(ids), "data_prefix": {"sub_data_root": "x/"}}, ("a",))
    cut = limit_test_split(files, 2, tmp_path / "work")
    assert Path(cut.test["ann_file"]).read_text() == "000001\n000004\n"
    assert cut.test["data_prefix"] == {"sub_data_root": "x/"}


def test_a_broken_annotation_file_names_itself(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    files = DatasetFiles("lvis", tmp_path, (), {"ann_file": str(bad)}, ("a",))
    with pytest.raises(DataError, match="bad.json: not a COCO-style annotation file"):
        limit_test_split(files, 2, tmp_path / "work")


def test_max_test_images_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_test_images: 0; must be ≥ 1"):
        DetectionConfig(max_test_images=0)


@pytest.mark.parametrize("c4", [True, False])
def test_rpn_test_proposals_sets_the_test_rpn_top_k(c4: bool) -> None:
    from densessl.evaluate.transfer.mmdet_model_cfg import _train_test_cfg

    _, published = _train_test_cfg(DetectionConfig(), c4, 14)
    _, smoke = _train_test_cfg(DetectionConfig(rpn_test_proposals=100), c4, 14)
    assert published["rpn"]["max_per_img"] == 1000 and smoke["rpn"]["max_per_img"] == 100
    assert smoke["rpn"]["nms_pre"] == published["rpn"]["nms_pre"] == (6000 if c4 else 1000)


def test_the_smoke_detectors_test_a_subset_and_the_paper_ones_everything() -> None:
    from densessl.config import load_config
    from densessl.methods.base import build_dataclass

    root = Path(__file__).resolve().parents[1]
    for preset, images, proposals in (("smoke", 50, 100), ("paper", None, 1000)):
        cfg = load_config([], preset=preset, root=root, check_settings=False)
        for protocol in ("maskrcnn_r50_c4_coco", "maskrcnn_r50_fpn_lvis", "fasterrcnn_r50_c4_voc"):
            det = build_dataclass(DetectionConfig, cfg.eval_settings(protocol), protocol)
            assert (det.max_test_images, det.rpn_test_proposals) == (images, proposals), (preset, protocol)


def test_a_relative_work_dir_gives_an_absolute_annotation_path(tmp_path: Path, monkeypatch) -> None:
    # the DAG passes results/<preset>/eval/... relative to the project; mmdet would join it onto data_root
    files = _coco(tmp_path)
    monkeypatch.chdir(tmp_path)
    cut = limit_test_split(files, 2, Path("work"))
    assert Path(cut.test["ann_file"]).is_absolute() and Path(cut.test["ann_file"]).parent == tmp_path / "work"
