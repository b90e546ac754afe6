"""The report's plots: what each figure reads from the stages' files, what it says when something is missing,
and that the inline SVG is the same on every build (tests/report_project.py builds the inputs)."""

from __future__ import annotations

import pytest
import report_project
from conftest import REPO

from densessl.report import plots, plots_html
from densessl.report.build import build_report


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    return report_project.make(tmp_path)


def _by_id(figures):
    return {f.id: f for f in figures}


def test_pretraining_curves_read_metrics_jsonl_and_skip_a_torn_last_line(cfg):
    figures, notes = plots.pretraining_figures(cfg)
    assert notes == []
    found = _by_id(figures)
    dino = found["plot-pretrain-dino-vit-tiny-p8-imagenet"]
    assert [p.ylabel for p in dino.panels] == ["loss", "entropy (nats)"]
    loss = dino.panels[0].series[0]
    assert loss.x == list(range(0, 20, 2)) and loss.y[0] == 5.0 and loss.y[-1] == pytest.approx(3.2)
    assert [s.label for s in dino.panels[1].series] == ["teacher entropy"]  # batch entropy is not a curve here
    supervised = found["plot-pretrain-supervised-vit-tiny-p8-coco"]
    assert len(supervised.panels) == 1 and supervised.notes == ["supervised logs no teacher entropy."]


def test_a_run_that_has_not_run_has_no_curve_and_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    cfg = report_project.make(tmp_path, pretrain_logs=False)
    figures, notes = plots.pretraining_figures(cfg)
    assert figures == []
    assert notes == [f"{r.id}: no metrics.jsonl (the run has not started); no curve." for r in cfg.pretrain_runs]


def test_per_class_iou_per_row_with_absent_classes_left_out(cfg):
    figures, notes = plots.per_class_figures(cfg)
    assert notes == [] and [f.id for f in figures] == ["plot-per-class-linear-ade20k"]
    series = figures[0].panels[0].series
    assert [s.label for s in series] == [r.id for r in cfg.protocol_runs("linear_ade20k")]
    assert series[0].x == ["0", "1", "2", "3"] and series[0].y[1] is None
    assert "no IoU and no point" in figures[0].notes[0]


def test_per_class_iou_by_name_as_the_mmseg_protocols_record_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    cfg = report_project.make(tmp_path)
    cfg.data["evaluations"] = ["semfpn_ade20k"]
    run = cfg.protocol_runs("semfpn_ade20k")[0]
    report_project.write(cfg.eval_metrics("semfpn_ade20k", run),
                         {"metrics": {"mIoU": 1.0, "per_class_IoU": {"wall": 12.5, "sky": None}}})
    figures, notes = plots.per_class_figures(cfg)
    assert [(s.label, s.x, s.y) for s in figures[0].panels[0].series] == [(run.id, ["wall", "sky"], [12.5, None])]
    others = [r.id for r in cfg.protocol_runs("semfpn_ade20k")[1:]]
    assert figures[0].notes[0] == "no per-class IoU recorded (not evaluated yet) for " + ", ".join(others) + "."


def test_davis_j_and_f_per_sequence_is_the_mean_over_its_objects():
    per_object = {"bear_1": {"J-Mean": 0.5, "F-Mean": 0.3}, "dogs_1": {"J-Mean": 0.2, "F-Mean": 0.4},
                  "dogs_2": {"J-Mean": 0.4, "F-Mean": 0.2}, "bmx-trees_1": {"J-Mean": float("nan"), "F-Mean": 0.1}}
    assert plots.davis_sequences(per_object) == pytest.approx({"bear": 40.0, "dogs": 30.0, "bmx-trees": None})


def test_davis_figure_names_the_rows_without_per_sequence_scores(cfg):
    figures, notes = plots.davis_figures(cfg)
    assert notes == [] and len(figures) == 1
    series = figures[0].panels[0].series
    assert report_project.NO_SEQUENCES not in [s.label for s in series] and len(series) == 3
    assert series[0].x == ["bear", "dogs"] and series[0].y[0] == pytest.approx(40.0)
    assert figures[0].notes == [f"no per-sequence scores recorded (not evaluated yet) for "
                                f"{report_project.NO_SEQUENCES}."]


def _cell(table, value, published, metric="mIoU"):
    return {"table": table, "run": "loca/vit-s16-imagenet", "role": "pretrained", "method": "LOCA",
            "arch": "ViT-S/16", "pretrain_data": "ImageNet-1k", "metric": metric, "value": value,
            "published": published}


def test_ours_against_published_only_where_both_exist():
    cells = [_cell("linear_ade20k", 40.1, 44.8), _cell("linear_ade20k", 30.0, None, "mAcc"),
             _cell("davis2017", None, 60.0, "JF_mean")]
    figures, notes = plots.published_figures(cells)
    assert notes == [] and [f.id for f in figures] == ["plot-published-linear-ade20k"]
    ours, published = figures[0].panels[0].series
    assert (ours.label, ours.y, published.label, published.y) == ("ours", [40.1], "published", [44.8])
    assert ours.x == ["LOCA, ViT-S/16: mIoU"]
    svg = plots_html.figure_html(figures[0])
    assert "id='plot-published-linear-ade20k'" in svg and 'id="plot-published-linear-ade20k-s0-1"' in svg


def test_without_published_numbers_there_is_no_chart_but_a_note():
    figures, notes = plots.published_figures([_cell("linear_ade20k", 40.1, None)])
    assert figures == [] and len(notes) == 1 and "no plot" in notes[0]


def test_the_section_is_inline_svg_with_stable_ids_and_the_same_on_every_build(cfg):
    first = plots_html.html_section(cfg, [])
    assert first == plots_html.html_section(cfg, [])
    assert "<?xml" not in first and "<!DOCTYPE" not in first and "dc:date" not in first
    assert first.count("<svg") == 4 and "<text" in first  # svg.fonttype none: labels stay text
    for series in ("plot-pretrain-dino-vit-tiny-p8-imagenet-s0-0", "plot-pretrain-dino-vit-tiny-p8-imagenet-s1-0",
                   "plot-davis-sequences-s0-2", "plot-per-class-linear-ade20k-s0-3"):
        assert f'<g id="{series}">' in first


def test_build_report_puts_the_plots_into_index_html(cfg):
    build_report(cfg)
    page = (cfg.report_dir / "index.html").read_text()
    plots_at, provenance_at = page.index("<section id='plots'>"), page.index("<h2>Provenance</h2>")
    assert plots_at < provenance_at and page.count("class='densessl-plot'") == 4


def test_a_long_curve_is_drawn_from_every_n_th_step_and_says_so():
    steps = list(range(10_001))
    x, y, stride = plots_html.thinned(steps, [float(s) for s in steps])
    assert stride == 6 and len(x) <= plots_html.MAX_POINTS + 1 and (x[0], x[-1]) == (0, 10_000) and y == x
    figure = plots.Figure("plot-long", "pretraining", "long", "line", "step",
                          [plots.Panel("loss", [plots.Series("loss", steps, [1.0] * len(steps))])])
    assert "drawn from every 6-th logged step (of up to 10001)." in plots_html.figure_html(figure)
    assert plots_html.thinned([1, 2], [3.0, 4.0]) == ([1, 2], [3.0, 4.0], 1)
