"""Patch-Seg: label reduction, preprocessing, the COCO/ADE20K readers and tiny end-to-end probes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.ade20k import ADE20KSegmentation
from densessl.data.coco import CocoStuffPatchSegDataset, coco_label_assignment
from densessl.errors import ConfigError, DataError
from densessl.evaluate.patchseg import (
    PatchSegConfig,
    _train_mode_is_stochastic,
    largest_center_crop_box,
    preprocess_image,
    preprocess_labels,
    reduce_labels,
    run_patchseg,
)
from densessl.models.backbones import create_backbone

# raw COCO-Stuff ids -> colour; Patch-Seg ids are raw + 1 (255 -> 0)
COLOURS = {0: (220, 30, 30), 1: (30, 200, 40), 2: (40, 60, 220), 255: (128, 128, 128)}


def write_coco(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0, w: int = 80, h: int = 64,
               p: int = 8) -> Path:
    """COCO-Stuff fixture in the Patch-Seg layout: every 8x8 patch one solid colour = one class.

    80x64 images: the centred 64x64 crop starts at x=8, so patches stay aligned with the label grid.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ids = rng.choice([0, 1, 2, 255], size=(h // p, w // p), p=[0.3, 0.3, 0.3, 0.1])
            lab = np.kron(ids, np.ones((p, p), dtype=np.int64)).astype(np.uint8)
            img = np.zeros((h, w, 3), np.uint8)
            for k, c in COLOURS.items():
                img[lab == k] = c
            Image.fromarray(img).save(root / "images" / split / f"{i:012d}.jpg", quality=95)
            Image.fromarray(lab).save(root / "annotations" / split / f"{i:012d}.png")
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit-tiny-p8")


# ---------------------------------------------------------------- label reduction


def _grid(blocks: list[list[list[int]]], p: int = 2) -> torch.Tensor:
    """2x2 patches of 2x2 pixels from a nested list [patch_row][patch_col] = 4 pixel ids (row-major)."""
    out = torch.zeros(2 * p, 2 * p, dtype=torch.long)
    for i, row in enumerate(blocks):
        for j, pix in enumerate(row):
            out[i * p:(i + 1) * p, j * p:(j + 1) * p] = torch.tensor(pix).view(p, p)
    return out


LABELS = _grid([[[0, 0, 0, 0], [0, 0, 3, 3]],  # only unlabelled | unlabelled + class 3
                [[1, 1, 2, 2], [2, 4, 4, 2]]])  # tie 1/2 | 2 and 4 tie (2 each)


def test_union_keeps_class0_only_when_alone() -> None:
    u = reduce_labels(LABELS, 2, 5, "union")
    assert u.shape == (2, 2, 5) and u.dtype == torch.uint8
    assert u[0, 0].tolist() == [1, 0, 0, 0, 0]  # only class 0 -> stays on
    assert u[0, 1].tolist() == [0, 0, 0, 1, 0]  # 0 with another class -> switched off
    assert u[1, 0].tolist() == [0, 1, 1, 0, 0]
    assert u[1, 1].tolist() == [0, 0, 1, 0, 1]


def test_majority_ties_go_to_smallest_id() -> None:
    m = reduce_labels(LABELS, 2, 5, "majority")
    assert m.tolist() == [[0, 0], [1, 2]]  # (0,1): 0 and 3 tie -> 0; (1,0): 1/2 -> 1; (1,1): 2/4 -> 2
    assert reduce_labels(torch.tensor([[3, 3], [3, 1]]), 2, 5, "majority").tolist() == [[3]]


def test_global_union_includes_unlabelled_without_override() -> None:
    g = reduce_labels(LABELS, 2, 6, "global-union")
    assert g.tolist() == [1, 1, 1, 1, 1, 0]


def test_reduction_drops_pixels_beyond_last_whole_patch() -> None:
    lab = torch.zeros(5, 5, dtype=torch.long)
    lab[4, :] = 3  # last row lies outside the 2x2 grid of 2-pixel patches
    lab[:, 4] = 3
    assert reduce_labels(lab, 2, 4, "global-union").tolist() == [1, 0, 0, 0]
    assert reduce_labels(lab, 2, 4, "union").shape == (2, 2, 4)


# ---------------------------------------------------------------- preprocessing


def test_largest_center_crop_box() -> None:
    assert largest_center_crop_box(80, 64) == (8, 0, 72, 64)
    assert largest_center_crop_box(64, 81) == (0, 8, 64, 72)  # offsets rounded down


def test_preprocess_crops_and_resizes_label_nearest() -> None:
    lab = np.zeros((40, 60), np.uint8)
    lab[:, :10] = 7  # outside the centred 40x40 crop (x from 10 to 50)
    lab[:20, 10:30] = 5
    out = preprocess_labels(lab, 20)
    assert out.shape == (20, 20) and out.dtype == torch.int64
    assert 7 not in out.unique().tolist()
    assert set(out.unique().tolist()) == {0, 5}  # nearest: no interpolated ids
    assert (out[:10, :10] == 5).all() and (out[10:, :] == 0).all()
    img = Image.fromarray(np.full((40, 60, 3), 255, np.uint8))
    x = preprocess_image(img, 20, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (3, 20, 20)
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25


# ---------------------------------------------------------------- readers


def test_coco_reader_pairs_shifts_and_limits(coco_root: Path) -> None:
    ds = CocoStuffPatchSegDataset(coco_root, "train")
    assert len(ds) == 8 and ds.num_classes == 183
    image, labels = ds[0]
    assert image.mode == "RGB" and image.size == (80, 64)
    assert labels.dtype == np.uint8 and labels.shape == (64, 80)
    raw = CocoStuffPatchSegDataset(coco_root, "train", label_assignment=False)[0][1]
    assert set(np.unique(raw)) <= {0, 1, 2, 255}
    np.testing.assert_array_equal(labels, coco_label_assignment(raw))
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert (labels[raw == 255] == 0).all() and (labels[raw == 0] == 1).all()
    lim = CocoStuffPatchSegDataset(coco_root, "val", max_items=2)
    assert lim.stems == sorted(CocoStuffPatchSegDataset(coco_root, "val").stems)[:2]


def test_coco_label_assignment_values() -> None:
    np.testing.assert_array_equal(coco_label_assignment(np.array([0, 181, 255], np.uint8)), [1, 182, 0])


def test_coco_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="images/train2017"):
        CocoStuffPatchSegDataset(tmp_path, "train")
    root = write_coco(tmp_path / "c", n_train=2, n_val=1)
    extra = root / "images" / "train2017" / "000000000099.jpg"
    Image.new("RGB", (8, 8)).save(extra)
    with pytest.raises(DataError, match="000000000099.jpg.*no label map"):
        CocoStuffPatchSegDataset(root, "train")
    extra.unlink()
    orphan = root / "annotations" / "train2017" / "000000000042.png"
    Image.new("L", (8, 8)).save(orphan)
    with pytest.raises(DataError, match="000000000042.png.*no image"):
        CocoStuffPatchSegDataset(root, "train")
    orphan.unlink()
    for f in (root / "annotations" / "val2017").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no label maps"):
        CocoStuffPatchSegDataset(root, "val")
    bad = root / "annotations" / "train2017" / "000000000000.png"
    Image.new("L", (10, 10)).save(bad)  # wrong size
    with pytest.raises(DataError, match="000000000000.png.*same size"):
        CocoStuffPatchSegDataset(root, "train")[0]
    Image.new("RGB", (80, 64)).save(bad)  # colour-coded map
    with pytest.raises(DataError, match="single-channel"):
        CocoStuffPatchSegDataset(root, "train")[0]


def test_ade_reader_accepts_parent_or_release_folder(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (i, 0, 0)).save(base / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray(np.full((10, 12), 150 - i, np.uint8)).save(base / "annotations" / split / f"ADE_{split}_{i}.png")
    a = ADE20KSegmentation(tmp_path, "train")
    b = ADE20KSegmentation(base, "val", max_items=2)
    assert len(a) == 3 and len(b) == 2
    img, lab = a[0]
    assert img.size == (12, 10) and lab.shape == (10, 12) and int(lab[0, 0]) == 150  # labels unchanged
    with pytest.raises(DataError, match="ADEChallengeData2016"):
        ADE20KSegmentation(tmp_path / "nowhere", "train")


# ---------------------------------------------------------------- end to end


def _cfg(**kw: object) -> PatchSegConfig:
    base: dict[str, object] = {"dataset": "coco", "head": "linear", "label_reduction": "union", "batch_size": 4,
                               "epochs": 10, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "precision": "fp32"}
    base.update(kw)
    return PatchSegConfig(**base)  # type: ignore[arg-type]


ROW_KEYS = {"dataset", "label_reduction", "output_head", "num_epochs", "loss", "accuracy", "macro_accuracy",
            "macro_recall", "macro_precision", "macro_f1"}


def test_linear_probe_learns_separable_union(coco_root: Path, backbone: torch.nn.Module, tmp_path: Path) -> None:
    r = run_patchseg(backbone, coco_root, _cfg(), out_dir=tmp_path)
    assert ROW_KEYS <= set(r)
    assert r["num_classes"] == 183 and r["grid_size"] == 8 and r["steps_per_epoch"] == 2
    assert len(r["epochs"]) == 10 and 0 <= r["best_epoch"] < 10
    assert r["macro_recall"] == max(e["val"]["macro_recall"] for e in r["epochs"])
    assert r["num_valid_classes"] == 4  # Patch-Seg ids 0 (unlabelled alone), 1, 2, 3
    assert r["macro_recall"] >= 0.9
    assert r["macro_f1_nanmean"] >= 0.8  # not just "everything positive"
    for k in ("accuracy", "macro_accuracy", "macro_recall", "macro_precision_nanmean", "macro_f1_nanmean"):
        assert 0.0 <= r[k] <= 1.0
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["macro_recall"] == pytest.approx(r["macro_recall"])
    assert on_disk["feature_cache"] == {"train": True, "val": True}
    # diagnostic: the effective rank of the validation patch tokens, between 1 and the embedding width
    assert 1.0 <= r["feature_effective_rank"] <= backbone.embed_dim


def test_linear_probe_learns_separable_majority(coco_root: Path, backbone: torch.nn.Module) -> None:
    r = run_patchseg(backbone, coco_root, _cfg(label_reduction="majority"))
    assert r["macro_recall"] >= 0.95 and r["accuracy"] >= 0.95


def test_shuffled_labels_do_not_reach_high_recall(tmp_path: Path, backbone: torch.nn.Module) -> None:
    """Control for the test above: the same probe cannot score on maps that do not match the images."""
    root = write_coco(tmp_path / "c")
    for split in ("train2017", "val2017"):
        maps = sorted((root / "annotations" / split).iterdir())
        arrays = [np.array(Image.open(m)) for m in maps]
        for m, arr in zip(maps, arrays[1:] + arrays[:1]):
            Image.fromarray(arr).save(m)
    r = run_patchseg(backbone, root, _cfg(label_reduction="majority"))
    assert r["macro_recall"] < 0.7


def test_cached_and_streamed_features_agree(coco_root: Path, backbone: torch.nn.Module) -> None:
    cfg = _cfg(epochs=2, head="mlp", hidden_size=32)
    a = run_patchseg(backbone, coco_root, cfg)
    b = run_patchseg(backbone, coco_root, _cfg(epochs=2, head="mlp", hidden_size=32, cache_features=False))
    assert b["feature_cache"] == {"train": False, "val": False}
    assert b["feature_effective_rank"] is None and a["feature_effective_rank"] is not None  # needs the cache
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-4)
        assert ea["val"]["macro_recall"] == pytest.approx(eb["val"]["macro_recall"], abs=1e-6)


def test_transformer_global_union_and_class_balance(coco_root: Path, backbone: torch.nn.Module) -> None:
    r = run_patchseg(backbone, coco_root, _cfg(head="transformer", label_reduction="global-union", epochs=1,
                                               class_balanced=True))
    assert r["output_head"] == "transformer" and r["feature_mode"] == "keep_all"
    w = torch.tensor(r["class_weights"])
    assert w.shape == (183,)
    assert (w[4:] == 1).all()  # classes without positives keep weight 1
    assert 0 <= r["macro_recall"] <= 1 and r["num_epochs"] == 1
    r = run_patchseg(backbone, coco_root, _cfg(label_reduction="majority", epochs=1, class_balanced=True))
    assert len(r["class_weights"]) == 183 and not math.isnan(r["loss"])


def test_stochastic_backbone_streams_train_split(coco_root: Path) -> None:
    noisy = create_backbone("vit-tiny-p8", drop_path_rate=0.1)
    assert _train_mode_is_stochastic(noisy)
    assert not _train_mode_is_stochastic(create_backbone("vit-tiny-p8"))
    r = run_patchseg(noisy, coco_root, _cfg(epochs=1))
    assert r["feature_cache"] == {"train": False, "val": True}


def test_bad_config_and_too_few_images(coco_root: Path, backbone: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="label_reduction"):
        run_patchseg(backbone, coco_root, _cfg(label_reduction="mode"))
    with pytest.raises(ConfigError, match="batch_size"):
        run_patchseg(backbone, coco_root, _cfg(batch_size=64))


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densessl.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("ade20k")
    synthesize("ade20k", root, "tiny", seed=0)  # 8 train, 6 val images in the ADEChallengeData2016 layout
    return root


@pytest.mark.parametrize("reduction", ["union", "majority"])
def test_ade20k_end_to_end_predicts_151_classes(ade_root: Path, backbone: torch.nn.Module,
                                                monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """patchseg_ade20k: 151 classes (0 = unlabelled kept as a class), metrics over the classes in val."""
    import densessl.evaluate.patchseg as patchseg

    heads: list[torch.nn.Module] = []
    original = patchseg.build_head

    def recording_build_head(*args: object, **kwargs: object) -> torch.nn.Module:
        heads.append(original(*args, **kwargs))  # type: ignore[arg-type]
        return heads[-1]

    monkeypatch.setattr(patchseg, "build_head", recording_build_head)
    r = run_patchseg(backbone, ade_root, _cfg(dataset="ade20k", label_reduction=reduction, epochs=3))

    assert ROW_KEYS | {"macro_precision_nanmean", "macro_f1_nanmean", "num_valid_classes", "per_class"} <= set(r)
    assert r["dataset"] == "ade20k" and r["num_classes"] == 151 and r["num_train"] == 8 and r["num_val"] == 6
    assert len(heads) == 1 and heads[0].out_features == 151
    assert all(len(v) == 151 for v in r["per_class"].values())

    # valid classes = the ids present in the reduced validation targets, computed here independently
    reader = ADE20KSegmentation(ade_root, "val")
    present: set[int] = set()
    for i in range(len(reader)):
        t = reduce_labels(preprocess_labels(reader.load_labels(i), 64), 8, 151, reduction)
        present |= set(torch.nonzero(t.reshape(-1, 151).sum(0) if reduction == "union" else
                                     torch.bincount(t.reshape(-1), minlength=151)).flatten().tolist())
    valid = {i for i, v in enumerate(r["per_class"]["valid"]) if v}
    assert valid == present and r["num_valid_classes"] == len(present) >= 5
    assert max(present) > 1  # ADE ids, not a relabelled 0..K range
    for k in ("accuracy", "macro_accuracy", "macro_recall", "macro_precision_nanmean", "macro_f1_nanmean", "loss"):
        assert math.isfinite(r[k]), k
    for k in ("accuracy", "macro_accuracy", "macro_recall", "macro_precision_nanmean", "macro_f1_nanmean"):
        assert 0.0 <= r[k] <= 1.0, k
    assert all(math.isfinite(r["per_class"]["recall"][c]) for c in valid)  # recall defined on every valid class
