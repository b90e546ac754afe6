"""Margins carry a paired standard error where the metric is a mean over items (DAVIS objects)."""

from __future__ import annotations

import math

import pytest

from densessl.report.build import ERROR_BAR_NOTE, _margin_text, _md_section
from densessl.report.uncertainty import paired_standard_error, per_item_scores


def davis(objects: dict[str, tuple[float, float]]) -> dict:
    per = {k: {"J-Mean": j, "F-Mean": f} for k, (j, f) in objects.items()}
    jf = sum(50 * (j + f) for j, f in objects.values()) / len(objects)
    return {"per_object": per, "JF_mean": jf}


def test_per_object_scores_are_the_reported_percentages():
    m = davis({"a_1": (0.5, 0.7), "a_2": (0.1, 0.3)})
    assert per_item_scores("davis2017", m, "JF_mean") == pytest.approx({"a_1": 60.0, "a_2": 20.0})
    assert per_item_scores("davis2017", m, "J_mean") == pytest.approx({"a_1": 50.0, "a_2": 10.0})
    assert per_item_scores("patchseg_coco", {"macro_recall": 0.2}, "macro_recall") is None


def test_paired_standard_error_by_hand():
    ours = davis({"a": (0.6, 0.6), "b": (0.4, 0.4), "c": (0.5, 0.5)})    # 60, 40, 50
    base = davis({"a": (0.5, 0.5), "b": (0.4, 0.4), "c": (0.3, 0.3)})    # 50, 40, 30 → diffs 10, 0, 20
    se, n = paired_standard_error("davis2017", ours, base, "JF_mean")
    assert n == 3 and se == pytest.approx(10.0 / math.sqrt(3))            # sample std of (10, 0, 20) is 10
    # a constant shift has no spread: the error bar is 0, not the spread of the scores themselves
    shifted = davis({"a": (0.6, 0.6), "b": (0.5, 0.5), "c": (0.4, 0.4)})
    assert paired_standard_error("davis2017", shifted, base, "JF_mean")[0] == pytest.approx(0.0)
    # other objects (other data) or a single object: no error bar rather than a wrong one
    assert paired_standard_error("davis2017", davis({"x": (0.5, 0.5), "y": (0.1, 0.1)}), base, "JF_mean") is None
    assert paired_standard_error("davis2017", davis({"a": (0.5, 0.5)}), davis({"a": (0.1, 0.1)}), "JF_mean") is None


def test_margin_text_and_note():
    ours = davis({"a": (0.6, 0.6), "b": (0.4, 0.4), "c": (0.5, 0.5)})
    base = davis({"a": (0.5, 0.5), "b": (0.4, 0.4), "c": (0.3, 0.3)})
    assert _margin_text("davis2017", ours, base, "JF_mean") == (f"+10.00 ± {10 / math.sqrt(3):.2f}", True)
    assert _margin_text("patchseg_coco", {"macro_recall": 0.25}, {"macro_recall": 0.2}, "macro_recall") == ("+0.05",
                                                                                                         False)
    text = _md_section("t", ["m"], [["x"]], [["DINO", "ViT", "+10.00 ± 5.77 (beats best of 3 seeds, 40.00)"]], ["JF_mean"])
    assert ERROR_BAR_NOTE in text
    assert ERROR_BAR_NOTE not in _md_section("t", ["m"], [["x"]], [["DINO", "ViT", "+0.05 (beats ...)"]], ["macro_recall"])
