"""DAVIS 2017: loader, J/F/statistics against hand-computed values, label propagation on scenes whose answer
is known, official CSV formats, and a tiny end-to-end run from an exported backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from densessl.checkpoints.io import save_backbone
from densessl.data.davis import Davis2017, read_annotation, resolve_davis_root, voc_palette
from densessl.errors import ConfigError, DataError
from densessl.evaluate.davis_metrics import (
    GLOBAL_COLUMNS,
    PER_SEQUENCE_COLUMNS,
    boundary_radius,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    dilate_disk,
    disk,
    evaluate_results,
    f_measure,
    seg2bmap,
    write_csvs,
)
from densessl.evaluate.davis_propagation import (
    DavisConfig,
    backbone_feature_fn,
    first_frame_labels,
    neighbourhood_mask,
    norm_mask,
    propagate_step,
    resized_hw,
    run_davis,
    run_davis_features,
    soft_to_mask,
)
from densessl.models.backbones import create_backbone

PALETTE = voc_palette()


# ----------------------------------------------------------------------------------------------------------
# Fixtures: DAVIS layouts written from label maps
# ----------------------------------------------------------------------------------------------------------

def write_layout(root: Path, sequences: dict[str, list[np.ndarray]], split: str = "val",
                 colours: dict[int, tuple[int, int, int]] | None = None) -> Path:
    """Write ``JPEGImages/480p``, ``Annotations/480p`` (palette PNGs) and ``ImageSets/2017/<split>.txt``.

    Frames are painted from the label maps: background black, every object white (``colours`` overrides),
    saved as near-lossless JPEGs.
    """
    colours = colours or {}
    for name, labels in sequences.items():
        img_dir = root / "JPEGImages" / "480p" / name
        ann_dir = root / "Annotations" / "480p" / name
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t, lab in enumerate(labels):
            img = np.zeros((*lab.shape, 3), np.uint8)
            for k in np.unique(lab):
                if k:
                    img[lab == k] = colours.get(int(k), (255, 255, 255))
            Image.fromarray(img).save(img_dir / f"{t:05d}.jpg", quality=100, subsampling=0)
            ann = Image.fromarray(lab.astype(np.uint8), "P")
            ann.putpalette(PALETTE)
            ann.save(ann_dir / f"{t:05d}.png")
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in sequences), encoding="utf-8")
    return root


def moving_squares(frames: int = 6, h: int = 12, w: int = 24) -> list[np.ndarray]:
    """Object 1: a 2x2 square at rows 3-4 moving right one pixel per frame (cols 2+t, 3+t);
    object 2: a static 2x2 square at rows 8-9, cols 18-19."""
    out = []
    for t in range(frames):
        lab = np.zeros((h, w), np.uint8)
        lab[3:5, 2 + t:4 + t] = 1
        lab[8:10, 18:20] = 2
        out.append(lab)
    return out


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    """Fake extractor at patch size 1: the normalised colour of each pixel is its feature, so black
    (background) and white (objects) pixels have cosine ~ -1 and identical colours cosine ~ 1."""
    return x


def small_cfg(**kw: object) -> DavisConfig:
    base: dict[str, object] = dict(short_side=12, size_multiple=1, size_mask_neighborhood=1, topk=5)
    base.update(kw)
    return DavisConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------------

def test_loader_reads_layout_in_split_order(tmp_path: Path) -> None:
    labels = moving_squares(frames=3)
    root = write_layout(tmp_path / "DAVIS", {"zebra": labels, "alpha": labels[:2]})
    for given in (tmp_path / "DAVIS", tmp_path):  # the DAVIS folder or its parent
        ds = Davis2017(given, "val")
        assert ds.root == root
        assert ds.sequences == ["zebra", "alpha"]  # ImageSets order, not alphabetical
    seq = ds["zebra"]
    assert seq.frame_ids == ["00000", "00001", "00002"]
    assert seq.first_annotation.name == "00000.png"
    ids, gt = seq.gt_labels()
    assert ids == ["00000", "00001", "00002"] and gt.shape == (3, 12, 24)
    assert np.array_equal(gt[2], labels[2])
    lab, pal = read_annotation(seq.annotation_paths[1])
    assert np.array_equal(lab, labels[1]) and pal[:9] == PALETTE[:9]
    assert Davis2017(root, "val", max_sequences=1).sequences == ["zebra"]
    assert Davis2017(root, "val", sequences=["alpha"]).sequences == ["alpha"]


def test_loader_void_becomes_background_in_gt(tmp_path: Path) -> None:
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0] = 255
    lab[1, 1] = 2
    write_layout(tmp_path, {"s": [lab, lab]})
    _, gt = Davis2017(tmp_path)["s"].gt_labels()
    assert gt[0, 0, 0] == 0 and gt[0, 1, 1] == 2


def test_loader_errors_name_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        resolve_davis_root(tmp_path / "nowhere")
    root = write_layout(tmp_path / "d", {"s": moving_squares(frames=2)})
    with pytest.raises(DataError, match=r"ImageSets/2017/train\.txt"):
        Davis2017(root, "train")
    (root / "ImageSets" / "2017" / "val.txt").write_text("s\nghost\n")
    with pytest.raises(DataError, match=r"JPEGImages/480p/ghost: no \*\.jpg frames"):
        Davis2017(root, "val")
    (root / "ImageSets" / "2017" / "val.txt").write_text("s\n")
    (root / "Annotations" / "480p" / "s" / "00000.png").unlink()
    with pytest.raises(DataError, match=r"00000\.png: first-frame annotation of sequence 's' not found"):
        _ = Davis2017(root, "val")["s"].first_annotation
    rgb = root / "Annotations" / "480p" / "s" / "00001.png"
    Image.new("RGB", (24, 12)).save(rgb)
    with pytest.raises(DataError, match="mode 'RGB'"):
        read_annotation(rgb)


# ----------------------------------------------------------------------------------------------------------
# J, F, statistics
# ----------------------------------------------------------------------------------------------------------

def square(h: int, w: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top:top + side, left:left + side] = True
    return m


def test_jaccard_shifted_square_and_empty_conventions() -> None:
    gt = square(100, 100, 40, 40, 10)
    pred = square(100, 100, 40, 43, 10)  # shifted 3 px: overlap 10x7 = 70, union 130
    assert db_eval_iou(gt, pred) == pytest.approx(70 / 130)
    empty = np.zeros((5, 5), bool)
    assert db_eval_iou(empty, empty) == 1.0  # empty union -> 1
    assert db_eval_iou(square(5, 5, 1, 1, 2), empty) == 0.0
    frames = np.stack([gt, np.zeros_like(gt)])
    np.testing.assert_allclose(db_eval_iou(frames, np.stack([pred, np.zeros_like(gt)])), [70 / 130, 1.0])


def test_seg2bmap_hand_cases() -> None:
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    # the pixel and its W, N and NW neighbours (boundary offset half a pixel towards the origin)
    assert set(zip(*np.nonzero(seg2bmap(one)))) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert seg2bmap(square(30, 30, 5, 5, 10)).sum() == 40  # the ring of an 11x11 box: 4 * side
    assert not seg2bmap(np.ones((6, 7), bool)).any()  # last row/column rules: a full mask has no boundary


def test_disk_and_radius_match_official() -> None:
    d2 = disk(2)
    assert d2.shape == (5, 5) and d2.sum() == 13 and d2[0, 2] == 1 and d2[0, 1] == 0
    assert boundary_radius((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert boundary_radius((100, 100)) == 2  # ceil(0.008 * 141.4)
    assert boundary_radius((100, 100), bound_th=3) == 3  # >= 1: pixels
    with pytest.raises(ConfigError):
        boundary_radius((10, 10), bound_th=2.5)


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_dilate_disk_equals_structuring_element(radius: int) -> None:
    rng = np.random.default_rng(radius)
    masks = rng.random((3, 23, 31)) < 0.03
    expected = np.stack([binary_dilation(m, structure=disk(radius).astype(bool)) for m in masks])
    assert np.array_equal(dilate_disk(masks, radius), expected)


def test_f_measure_shifted_square() -> None:
    """100x100 frame -> r = 2. The boundary rings (11x11 boxes, 40 px) shifted by 3 px: on each ring the top
    and bottom rows match 10 of 11 pixels, the side nearer the other square 4 of 9 (within 2 px of the other
    ring's top/bottom rows), the far side 0 of 9: P = R = 24/40 = 0.6, F = 0.6. A 2-px shift stays within r:
    F = 1."""
    gt = square(100, 100, 40, 40, 10)
    assert f_measure(square(100, 100, 40, 43, 10), gt) == pytest.approx(0.6)
    assert f_measure(square(100, 100, 40, 42, 10), gt) == pytest.approx(1.0)
    assert f_measure(square(100, 100, 42, 40, 10), gt) == pytest.approx(1.0)  # vertical, same radius


def test_f_measure_empty_conventions() -> None:
    empty = np.zeros((20, 20), bool)
    obj = square(20, 20, 5, 5, 4)
    assert f_measure(empty, empty) == 1.0  # P = R = 1
    assert f_measure(empty, obj) == 0.0  # no prediction: P = 1, R = 0
    assert f_measure(obj, empty) == 0.0  # no GT: P = 0, R = 1
    np.testing.assert_allclose(db_eval_boundary(np.stack([empty, obj]), np.stack([empty, obj])), [1.0, 1.0])


def test_statistics_mean_recall_decay() -> None:
    # n = 8: bin edges round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7]; first bin [0:3], last [5:8]
    values = np.array([1, 1, 1, 0.4, 0.6, 0.2, 0.3, 0.4])
    m, r, d = db_statistics(values)
    assert m == pytest.approx(4.9 / 8)
    assert r == pytest.approx(4 / 8)  # strictly > 0.5
    assert d == pytest.approx(1.0 - 0.3)
    # n = 3 with NaN: edges [0, 1, 1, 2, 2]; bins [nan, 1] and [0]; recall counts NaN as a miss
    m, r, d = db_statistics(np.array([np.nan, 1.0, 0.0]))
    assert (m, r, d) == (pytest.approx(0.5), pytest.approx(1 / 3), pytest.approx(1.0))
    assert db_statistics(np.array([0.5, 0.5])) == (0.5, 0.0, 0.0)
    assert all(np.isnan(db_statistics(np.array([]))))


# ----------------------------------------------------------------------------------------------------------
# Results folders and CSVs
# ----------------------------------------------------------------------------------------------------------

def write_results(folder: Path, name: str, labels: list[np.ndarray]) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    for t, lab in enumerate(labels):
        im = Image.fromarray(lab.astype(np.uint8), "P")
        im.putpalette(PALETTE)
        im.save(folder / name / f"{t:05d}.png")


def test_evaluation_scores_and_official_csvs(tmp_path: Path) -> None:
    gt = moving_squares()
    root = write_layout(tmp_path / "DAVIS", {"seqA": gt})
    ds = Davis2017(root)
    res = [g.copy() for g in gt]
    res[0][:] = 0  # first and last frames are not scored
    res[5][:] = 1
    res[4][res[4] == 1] = 0  # object 1 lost on the last scored frame
    write_results(tmp_path / "res", "seqA", res)
    scores = evaluate_results(tmp_path / "res", ds)
    assert scores.objects == ["seqA_1", "seqA_2"]
    # object 1: J = F = [1, 1, 1, 0]; n = 4 -> bins [0:2] and [2:4]: decay 1 - 0.5
    assert (scores.j["M"][0], scores.j["R"][0], scores.j["D"][0]) == (0.75, 0.75, 0.5)
    assert (scores.f["M"][0], scores.f["R"][0], scores.f["D"][0]) == (0.75, 0.75, 0.5)
    assert (scores.j["M"][1], scores.f["M"][1], scores.j["D"][1]) == (1.0, 1.0, 0.0)
    g = scores.global_metrics()
    assert list(g) == list(GLOBAL_COLUMNS)
    assert g["J&F-Mean"] == pytest.approx(0.875) and g["J-Decay"] == pytest.approx(0.25)

    global_csv, seq_csv = write_csvs(tmp_path / "res", scores)
    assert global_csv.name == "global_results-val.csv" and seq_csv.name == "per-sequence_results-val.csv"
    assert global_csv.read_text().splitlines() == [
        "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay",
        "0.875,0.875,0.875,0.250,0.875,0.875,0.250"]
    assert seq_csv.read_text().splitlines() == ["Sequence,J-Mean,F-Mean", "seqA_1,0.750,0.750", "seqA_2,1.000,1.000"]
    assert tuple(seq_csv.read_text().splitlines()[0].split(",")) == PER_SEQUENCE_COLUMNS


def test_evaluation_rejects_bad_results(tmp_path: Path) -> None:
    gt = moving_squares(frames=4)
    ds = Davis2017(write_layout(tmp_path / "DAVIS", {"s": gt}))
    write_results(tmp_path / "extra", "s", [np.where(g == 2, 3, g) for g in gt])
    with pytest.raises(DataError, match="object id 3 but the first annotation has only 2"):
        evaluate_results(tmp_path / "extra", ds)
    write_results(tmp_path / "short", "s", gt[:2])
    with pytest.raises(DataError, match=r"short/s/00002\.png: result mask not found"):
        evaluate_results(tmp_path / "short", ds)
    write_results(tmp_path / "missing_obj", "s", [np.where(g == 2, 0, g) for g in gt])  # zero-padded
    scores = evaluate_results(tmp_path / "missing_obj", ds)
    assert scores.j["M"] == [1.0, 0.0] and scores.f["M"] == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------
# Propagation pieces
# ----------------------------------------------------------------------------------------------------------

def test_resize_rule_480p() -> None:
    assert resized_hw(480, 854) == (480, 832)  # 52 x 30 patches at /16
    assert resized_hw(854, 480) == (832, 480)
    assert resized_hw(480, 910) == (480, 896)
    assert resized_hw(1080, 1920) == (480, 832)  # 853.3 -> 832
    assert resized_hw(480, 480) == (480, 448)
    assert resized_hw(12, 24, 12, 1) == (12, 24)


def test_first_frame_labels_one_hot_on_grid() -> None:
    lab = np.zeros((16, 16), np.uint8)
    lab[8:, 8:] = 2
    lab[0, 0] = 255
    onehot = first_frame_labels(lab, (2, 2), void_as_background=True)
    assert onehot.shape == (3, 2, 2)  # channels = max id on the grid + 1
    assert onehot[2].tolist() == [[0, 0], [0, 1]] and onehot[1].sum() == 0
    assert onehot[0].tolist() == [[1, 1], [1, 0]]


def test_neighbourhood_mask_window() -> None:
    m = neighbourhood_mask(3, 4, radius=1)
    assert m.shape == (12, 12)
    assert m.sum(1).view(3, 4).tolist() == [[4, 6, 6, 4], [6, 9, 9, 6], [4, 6, 6, 4]]
    assert m[0, 5] == 1 and m[0, 2] == 0 and m[0, 8] == 0  # (0,0) sees (1,1), not (0,2) or (2,0)
    assert torch.equal(m, m.T)


def test_propagate_step_topk_and_temperature() -> None:
    target = torch.tensor([[1.0, 0.0]])
    sources = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # cos 1, 0, -1
    labels = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])  # (K=1, C=2, N=3): source 0 is class 1
    out = propagate_step(target, sources, labels, None, topk=2, temperature=0.1)
    e = np.exp(10.0)
    assert out[:, 0].tolist() == pytest.approx([1 / (e + 1), e / (e + 1)])
    out = propagate_step(target, sources, labels, None, topk=2, temperature=1.0)
    assert out[1, 0].item() == pytest.approx(np.e / (np.e + 1))
    out = propagate_step(target, sources, labels, None, topk=3, temperature=1.0)
    assert out[1, 0].item() == pytest.approx(np.e / (np.e + 1 + 1 / np.e))
    # ties at the k-th value are all kept (script: aff[aff < min(topk)] = 0)
    tied = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    assert propagate_step(target, tied, labels, None, topk=1, temperature=0.1)[:, 0].tolist() == [0.5, 0.5]
    # the window mask removes a source before the top-k: only source 2 (cos -1) is left
    mask = torch.tensor([[0.0, 0.0, 1.0]])
    out = propagate_step(target, sources, labels, mask, topk=2, temperature=0.1)
    assert out[:, 0].tolist() == pytest.approx([1.0, 0.0])
    # query chunks change nothing
    t2 = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    s2 = torch.nn.functional.normalize(torch.randn(2, 7, 4), dim=2)
    l2 = torch.rand(2, 3, 7)
    assert torch.allclose(propagate_step(t2, s2, l2, None, 3, 0.1, chunk=2),
                          propagate_step(t2, s2, l2, None, 3, 0.1, chunk=100))


def test_norm_mask_changes_the_argmax() -> None:
    soft = torch.tensor([[[0.6, 0.5]], [[0.4, 0.45]]])  # raw argmax: background twice
    assert soft_to_mask(soft.clone(), 1, (1, 2)).tolist() == [[0, 1]]  # min-max per channel first
    assert norm_mask(torch.zeros(2, 1, 2)).sum() == 0  # channels without a positive max are left alone


def test_soft_to_mask_bilinear_upsampling() -> None:
    """One object patch in a 3x3 grid at patch size 8. Bilinear weights of the patch inside it are
    a = 1 - |(i + 0.5) / 8 - 0.5| = .5625, .6875, .8125, .9375, .9375, ...; object = a_y * a_x, background =
    1 - object. ``norm_mask`` runs after upsampling: object / .9375^2 against (background - (1 - .9375^2)) /
    .9375^2, so the object wins where a_y * a_x > .9375^2 / 2 = .4395: .5625 pairs with >= .8125, .6875 with
    >= .6875, the rest with all (52 pixels). The result is then nearest-resized to the frame (48x48)."""
    obj = torch.zeros(3, 3)
    obj[1, 1] = 1.0
    soft = torch.stack([1 - obj, obj])
    octagon = np.array([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]] + [[1] * 8] * 4
                       + [[0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]])
    assert octagon.sum() == 52
    expected = np.zeros((24, 24), np.uint8)
    expected[8:16, 8:16] = octagon
    assert np.array_equal(soft_to_mask(soft.clone(), 8, (24, 24)), expected)
    big = soft_to_mask(soft.clone(), 8, (48, 48))
    assert np.array_equal(big, np.kron(expected, np.ones((2, 2), np.uint8)))


def test_backbone_features_with_and_without_final_norm() -> None:
    torch.manual_seed(0)
    model = create_backbone("vit-tiny-p8").eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        normed = backbone_feature_fn(model, True)(x)
        raw = backbone_feature_fn(model, False)(x)
    assert normed.shape == raw.shape == (2, 128, 2, 3)
    assert torch.allclose(model.norm(raw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), normed, atol=1e-5)
    assert not torch.allclose(raw, normed, atol=1e-3)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="precision"):
        DavisConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 16"):
        DavisConfig(size_multiple=8).check_patch_size(16)
    cfg = DavisConfig()
    cfg.validate()
    assert (cfg.n_last_frames, cfg.size_mask_neighborhood, cfg.topk, cfg.temperature) == (7, 12, 5, 0.1)
    assert (cfg.short_side, cfg.size_multiple, cfg.std, cfg.bound_th) == (480, 64, (0.228, 0.224, 0.225), 0.008)


# ----------------------------------------------------------------------------------------------------------
# Propagation on scenes with known answers
# ----------------------------------------------------------------------------------------------------------

def test_propagation_follows_moving_object_through_previous_frames(tmp_path: Path) -> None:
    """With a +-1 px window, frame t >= 2 can only find object 1 in frame t-1 (frame 0 is too far): the queue
    of previous frames must carry its label. Object 2 looks identical but is outside every window, so labels
    never mix. Every predicted mask equals the GT: J = F = 1."""
    gt = moving_squares()
    root = write_layout(tmp_path / "DAVIS", {"squares": gt})
    out = tmp_path / "out"
    metrics = run_davis_features(pixel_features, 1, root, out, small_cfg(n_last_frames=1), "cpu")
    for t, g in enumerate(gt):
        with Image.open(out / "squares" / f"{t:05d}.png") as im:
            assert im.mode == "P" and im.getpalette()[:12] == PALETTE[:12]
            assert np.array_equal(np.array(im), g), f"frame {t}"
    expected = {"J&F-Mean": 1.0, "J-Mean": 1.0, "J-Recall": 1.0, "J-Decay": 0.0,
                "F-Mean": 1.0, "F-Recall": 1.0, "F-Decay": 0.0}
    assert {k: metrics[k] for k in GLOBAL_COLUMNS} == expected
    assert metrics["num_objects"] == 2 and metrics["num_frames"] == 6
    assert (out / "global_results-val.csv").read_text().splitlines()[1] == "1.000,1.000,1.000,0.000,1.000,1.000,0.000"


def test_propagation_from_first_frame_only_loses_the_object(tmp_path: Path) -> None:
    """Without previous frames only pixels within 1 px of the first-frame object get its label: at t=1 both
    columns (3, 4), at t=2 column 4 only (J = 0.5; the 2x1 result's boundary is within r = 1 of the GT's,
    F = 1), from t=3 nothing (J = F = 0)."""
    gt = moving_squares()
    root = write_layout(tmp_path / "DAVIS", {"squares": gt})
    out = tmp_path / "out"
    metrics = run_davis_features(pixel_features, 1, root, out, small_cfg(n_last_frames=0), "cpu")
    pred2 = np.array(Image.open(out / "squares" / "00002.png"))
    assert set(zip(*np.nonzero(pred2 == 1))) == {(3, 4), (4, 4)}
    assert not (np.array(Image.open(out / "squares" / "00003.png")) == 1).any()
    obj1 = metrics["per_object"]["squares_1"]
    assert obj1 == {"J-Mean": pytest.approx(1.5 / 4), "F-Mean": pytest.approx(0.5)}
    assert metrics["per_object"]["squares_2"] == {"J-Mean": 1.0, "F-Mean": 1.0}
    assert metrics["J-Mean"] == pytest.approx((0.375 + 1) / 2)
    assert metrics["J-Recall"] == pytest.approx((0.25 + 1) / 2)  # J = 0.5 is not a hit
    assert metrics["J-Decay"] == pytest.approx(0.75 / 2)  # bins [1, .5] and [0, 0]


def test_run_davis_from_exported_backbone(tmp_path: Path) -> None:
    labels = [np.kron(np.array([[0, 0, 1, 0, 0, 0], [0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]],
                                np.uint8), np.ones((8, 8), np.uint8))] * 4
    root = write_layout(tmp_path / "DAVIS", {"a": labels, "b": labels[:3]},
                        colours={1: (200, 40, 40), 2: (40, 200, 40)})
    torch.manual_seed(0)
    model = create_backbone("vit-tiny-p8")
    ckpt = tmp_path / "backbone.safetensors"
    save_backbone(ckpt, model, "vit-tiny-p8", {}, {"source": "test"})
    out = tmp_path / "results"
    cfg = DavisConfig(short_side=32, size_multiple=8, size_mask_neighborhood=2, n_last_frames=2)
    metrics = run_davis(ckpt, root, out, cfg, device="cpu")
    assert set(GLOBAL_COLUMNS) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in GLOBAL_COLUMNS if "Decay" not in k)
    assert metrics["J&F-Mean"] == pytest.approx((metrics["J-Mean"] + metrics["F-Mean"]) / 2)
    assert sorted(p.name for p in (out / "a").iterdir()) == [f"{t:05d}.png" for t in range(4)]
    assert np.array_equal(np.array(Image.open(out / "b" / "00000.png")), labels[0])  # first frame = GT
    assert (out / "global_results-val.csv").read_text().splitlines()[0] == ",".join(GLOBAL_COLUMNS)
    rows = (out / "per-sequence_results-val.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["Sequence", "a_1", "a_2", "b_1", "b_2"]
    assert metrics["arch"] == "vit-tiny-p8" and metrics["num_sequences"] == 2


@pytest.mark.parametrize("final_norm", [True, False])
def test_run_davis_with_a_resnet_as_patch_grid(tmp_path: Path, final_norm: bool) -> None:
    """CLoVE's ResNet is evaluated on its C5 map as a patch grid: the cell size is the output stride."""
    from densessl.evaluate.davis_propagation import run_davis_backbone
    from densessl.models.backbones import as_token_backbone

    labels = [np.kron(np.array([[0, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 1]], np.uint8), np.ones((8, 8), np.uint8))] * 3
    root = write_layout(tmp_path / "DAVIS", {"a": labels}, colours={1: (200, 40, 40), 2: (40, 200, 40)})
    torch.manual_seed(0)
    model = as_token_backbone(create_backbone("resnet-tiny"))
    cfg = DavisConfig(short_side=24, size_multiple=8, size_mask_neighborhood=2, n_last_frames=2,
                      final_norm=final_norm)
    metrics = run_davis_backbone(model, root, cfg, tmp_path / "out")
    assert 0.0 <= metrics["J&F-Mean"] <= 1.0
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "a" / "00000.png")), labels[0])
    assert Image.open(tmp_path / "out" / "a" / "00002.png").size == (32, 24)
