"""Metrics against hand-computed values and against a loop-by-loop transcription of the official formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densessl.evaluate.metrics import (
    IoUAccumulator,
    MulticlassConfusion,
    MultilabelConfusion,
    intersect_and_union,
    multiclass_metrics,
    multilabel_metrics,
    reduce_zero_label_map,
    total_area_to_metrics,
)

# ---------------------------------------------------------------- mmseg IoU


def test_two_class_image_known_iou() -> None:
    pred = np.array([[0, 0], [1, 1]])
    label = np.array([[0, 1], [1, 1]])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, num_classes=2)
    np.testing.assert_array_equal(inter, [1, 2])
    np.testing.assert_array_equal(area_pred, [2, 2])
    np.testing.assert_array_equal(area_label, [1, 3])
    np.testing.assert_array_equal(union, [2, 3])
    m = total_area_to_metrics(inter, union, area_pred, area_label)
    np.testing.assert_allclose(m["IoU"], [1 / 2, 2 / 3])
    np.testing.assert_allclose(m["Acc"], [1.0, 2 / 3])
    assert m["aAcc"] == pytest.approx(3 / 4)
    assert m["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["mAcc"] == pytest.approx((1 + 2 / 3) / 2)


def test_ignore_index_drops_predictions_too() -> None:
    pred = torch.tensor([[1, 1], [0, 1]])
    label = torch.tensor([[255, 1], [0, 255]])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, 2, ignore_index=255)
    np.testing.assert_array_equal(area_pred, [1, 1])  # the two predictions on ignored pixels do not count
    np.testing.assert_array_equal(area_label, [1, 1])
    np.testing.assert_array_equal(inter, [1, 1])
    np.testing.assert_array_equal(union, [1, 1])


def test_reduce_zero_label() -> None:
    np.testing.assert_array_equal(reduce_zero_label_map(np.array([0, 1, 2, 150, 255])), [255, 0, 1, 149, 255])
    # label 0 -> ignored; 1 -> class 0; 2 -> class 1
    label = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    pred = np.array([[1, 0], [1, 0]])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, 2, 255, reduce_zero_label=True)
    np.testing.assert_array_equal(area_label, [1, 2])
    np.testing.assert_array_equal(area_pred, [2, 1])
    np.testing.assert_array_equal(inter, [1, 1])
    np.testing.assert_array_equal(union, [2, 2])


def test_out_of_range_ids_fall_out_like_histc() -> None:
    pred = np.array([0, 5, 1])
    label = np.array([0, 1, 1])
    inter, _, area_pred, area_label = intersect_and_union(pred, label, 2)
    np.testing.assert_array_equal(area_pred, [1, 1])
    np.testing.assert_array_equal(area_label, [1, 2])
    np.testing.assert_array_equal(inter, [1, 1])


def test_accumulated_over_dataset_not_mean_of_images_and_nan_classes() -> None:
    acc = IoUAccumulator(num_classes=3)
    acc.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))  # image IoU class0 = 1
    acc.update(np.array([0, 1]), np.array([1, 1]))  # class0: 0/1, class1: 1/2
    m = acc.compute()
    # totals: class0 inter 4, union 5; class1 inter 1, union 2; class2 never occurs -> NaN
    np.testing.assert_allclose(m["IoU"][:2], [4 / 5, 1 / 2])
    assert math.isnan(m["IoU"][2]) and math.isnan(m["Acc"][2])
    assert m["mIoU"] == pytest.approx((4 / 5 + 1 / 2) / 2)  # NaN class skipped, as mmseg's nanmean
    assert m["aAcc"] == pytest.approx(5 / 6)
    assert acc.num_images == 2
    assert acc.compute(nan_to_num=0)["IoU"][2] == 0


def test_predicted_but_absent_class_has_iou_zero_not_nan() -> None:
    m = total_area_to_metrics(*intersect_and_union(np.array([1, 1]), np.array([0, 0]), 2))
    np.testing.assert_allclose(m["IoU"], [0.0, 0.0])
    assert math.isnan(m["Acc"][1])  # no label pixels of class 1
    assert m["mAcc"] == 0.0


# ---------------------------------------------------------------- Patch-Seg


def _official_multilabel(pred: torch.Tensor, tgt: torch.Tensor) -> dict[str, float]:
    """Loop transcription of patchseg/loss.py MultilabelMetricsHelper (per-class 2x2 matrices)."""
    c = pred.shape[1]
    cms = []
    for i in range(c):
        cm = torch.zeros(2, 2)
        for t, p in zip(tgt[:, i].tolist(), pred[:, i].tolist()):
            cm[t, p] += 1
        cms.append(cm)
    recall = torch.tensor([(cm.diag() / cm.sum(1))[1] for cm in cms])
    precision = torch.tensor([(cm.diag() / cm.sum(0))[1] for cm in cms])
    accuracy = torch.tensor([cm.diag().sum() / cm.sum() for cm in cms])
    f1 = 2 * precision * recall / (precision + recall + 1e-6)
    valid = torch.tensor([cm.sum(1)[1] > 0 for cm in cms])
    micro = sum(cm.diag().sum() for cm in cms) / sum(cm.sum() for cm in cms)
    return {"accuracy": float(micro), "macro_accuracy": float(accuracy[valid].mean()),
            "macro_recall": float(recall[valid].mean()), "macro_precision": float(precision[valid].mean()),
            "macro_f1": float(f1[valid].mean())}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


def test_multilabel_hand_values() -> None:
    # class 0: targets 1,1,0,0 preds 1,0,1,0 -> TP1 FN1 FP1 TN1; class 1: targets 1,0,0,0 preds 0,0,0,0;
    # class 2: never positive in targets (invalid), predicted once.
    tgt = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    pred = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    meter = MultilabelConfusion(3)
    meter.update(torch.where(pred.bool(), 2.0, -2.0), tgt)  # sigmoid(+-2) on either side of 0.5
    m = meter.compute()
    np.testing.assert_allclose(m["per_class"]["recall"][:2], [0.5, 0.0])
    assert m["per_class"]["precision"][0] == 0.5 and math.isnan(m["per_class"]["precision"][1])
    assert m["per_class"]["f1"][0] == pytest.approx(2 * 0.25 / (1 + 1e-6))
    np.testing.assert_allclose(m["per_class"]["accuracy"], [0.5, 0.75, 0.75])
    np.testing.assert_array_equal(m["per_class"]["valid"], [True, True, False])
    assert m["num_valid_classes"] == 2
    assert m["macro_recall"] == pytest.approx(0.25)
    assert m["macro_accuracy"] == pytest.approx(0.625)
    assert m["accuracy"] == pytest.approx(8 / 12)
    # class 1 is valid but never predicted: precision 0/0 -> official macro precision / F1 are NaN ...
    assert math.isnan(m["macro_precision"]) and math.isnan(m["macro_f1"])
    # ... while the NaN-aware means skip it
    assert m["macro_precision_nanmean"] == pytest.approx(0.5)
    assert m["macro_f1_nanmean"] == pytest.approx(0.5 / (1 + 1e-6))
    off = _official_multilabel(pred, tgt)
    for k, v in off.items():
        assert _same(m[k], v), k


def test_multilabel_matches_official_transcription_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=g) * 2 - 1
    tgt = (torch.rand(300, 7, generator=g) < 0.3).long()
    tgt[:, 6] = 0  # an invalid class
    meter = MultilabelConfusion(7)
    for chunk in range(0, 300, 64):  # accumulation across batches
        meter.update(logits[chunk:chunk + 64], tgt[chunk:chunk + 64])
    m = meter.compute()
    off = _official_multilabel((torch.sigmoid(logits) > 0.5).long(), tgt)
    for k, v in off.items():
        assert _same(m[k], v), k


def test_threshold_is_strict() -> None:
    meter = MultilabelConfusion(1)
    meter.update(torch.zeros(1, 1), torch.ones(1, 1))  # sigmoid(0) = 0.5 is not > 0.5: a miss
    assert meter.counts[0, 1, 0] == 1


def test_multiclass_hand_values() -> None:
    # targets 0,0,1,1,2 ; preds 0,1,1,1,0 ; class 3 absent in targets and predictions
    tgt = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    meter = MulticlassConfusion(4)
    meter.update(torch.nn.functional.one_hot(pred, 4).float() * 5, tgt)
    cm = meter.counts
    np.testing.assert_array_equal(cm[:3, :3], [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    m = meter.compute()
    np.testing.assert_allclose(m["per_class"]["recall"][:3], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(m["per_class"]["precision"][:2], [0.5, 2 / 3])
    assert math.isnan(m["per_class"]["precision"][2])  # class 2 never predicted
    # per-class accuracy (TP + TN) / total: class0 TN = 5-2-2+1 = 2 -> 3/5
    assert m["per_class"]["accuracy"][0] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["num_valid_classes"] == 3
    assert m["macro_recall"] == pytest.approx(0.5)
    assert math.isnan(m["macro_precision"]) and math.isnan(m["macro_f1"])
    assert m["macro_precision_nanmean"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_no_valid_class_gives_nan_not_error() -> None:
    m = multilabel_metrics(np.zeros((3, 2, 2), dtype=np.int64))
    assert math.isnan(m["macro_recall"]) and math.isnan(m["macro_precision_nanmean"])
    m = multiclass_metrics(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(m["macro_recall"]) and math.isnan(m["accuracy"])
