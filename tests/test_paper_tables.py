"""The papers' tables: every published number is matched to a DAG job or explained, and the report rebuilds
the tables cell by cell ("not run" where a job has not run, mean ± sd over seeds, the claimed gains tested)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from densessl.config import load_config
from densessl.errors import ConfigError
from densessl.report import paper_tables as pt
from densessl.report.cells import RowStat, gain_verdict
from densessl.report.paper_tables import accounting, load_tables, parse_tables, plan, published_count

# The methods this project trains, and its baselines: the rows of the tables that are "ours"
OWN_METHODS = {"dino", "selfpatch", "loca", "gtsa", "clove", "random-init", "supervised"}
COMPARED_RELEASES = {"pixpro", "densecl", "slotcon", "imagenet-supervised"}


def _paper():
    return load_config([REPO / "config.yaml"], preset="paper", root=REPO, check_settings=False)


def test_paper_preset_matches_or_explains_every_published_number():
    cfg = _paper()
    tables = load_tables()
    cells = plan(cfg, tables)
    assert published_count(tables) == len(cells) == 334
    counts = accounting(cells)
    assert counts == {"published": 334, "matched": 241, "unmatched": 93, "not configured": 0}
    # every number without a job says why, in the table itself (unmatched / not_configured)
    assert all(c.declared and c.reason for c in cells if c.status != "matched")
    jobs = set(cfg.evaluation_jobs())
    for c in cells:
        if c.status == "matched":
            assert c.jobs and all((j.protocol, j.run) in jobs for j in c.jobs), (c.table, c.row, c.column)
            assert all(j.metrics_path == cfg.eval_metrics(j.protocol, j.run) for j in c.jobs)
    by_id = {t.id: t for t in tables}

    def kind(c):
        key = by_id[c.table].rows[c.row].key
        if key is None:
            return "gain" if by_id[c.table].is_delta else "none"
        return ("released " if key.released else "") + ("own" if key.method in OWN_METHODS else "compared")

    status: dict[tuple[str, str], int] = {}
    for c in cells:
        status[(kind(c), c.status)] = status.get((kind(c), c.status), 0) + 1
    assert status == {
        ("own", "matched"): 107,            # our trained runs and random-init baselines: every number has a job
        ("gain", "matched"): 11,            # the abstracts' claimed gains, from the rows they compare
        ("released own", "matched"): 27,    # DINO ViT-S/16, S/8, B/16, B/8, ResNet-50 and LOCA zoo releases
        # PixPro 100/400 ep, DenseCL, SlotCon releases and the MSRA ImageNet-supervised ResNet-50 (27 numbers)
        ("released compared", "matched"): 96,
        ("none", "unmatched"): 93,          # other methods without usable weights, reference points, ...
    }
    methods = {(by_id[c.table].rows[c.row].key.method, c.status) for c in cells if kind(c) == "released compared"}
    assert {m for m, _ in methods} == COMPARED_RELEASES
    assert {m for m, status in methods if status == "not configured"} == set()
    # the target: every number of our own rows and of the releases has a job, the rest a reason
    assert counts["matched"] + counts["unmatched"] + counts["not configured"] == 334


def test_a_released_entry_for_a_compared_method_fills_its_rows(tmp_path):
    """Adding PixPro's 400-epoch release (format state_dict) to the configuration turns its rows from "not
    configured" into jobs of the very protocols our CLoVE runs are evaluated by; the 100-epoch rows stay apart."""
    path = tmp_path / "c.yaml"
    release = {"method": "pixpro", "arch": "resnet50", "data": "imagenet", "epochs": 400, "format": "state_dict",
               "path": str(tmp_path / "pixpro_base_r50_400ep.pth"),
               "options": {"checkpoint_key": "model", "prefix": "module.encoder.", "layout": "torchvision_resnet"}}
    path.write_text(yaml.safe_dump({"preset": "paper", "released": [release]}))
    cfg = load_config([path], root=REPO, check_settings=False)
    run = cfg.released_runs[0]
    assert run.id == "pixpro/resnet50-imagenet-400ep-released" and cfg.released_spec(run)["epochs"] == 400
    cells = [c for c in plan(cfg) if any(j.run == run for j in c.jobs)]
    assert {c.table for c in cells} == {"clove_coco_maskrcnn_c4", "clove_coco_maskrcnn_fpn", "clove_lvis_maskrcnn_fpn",
                                        "clove_cityscapes_maskrcnn_fpn", "clove_coco_keypoints", "pixpro_voc_c4",
                                        "pixpro_coco_maskrcnn_c4"}
    # every PixPro 400-epoch number (CLoVE tables 6 + 6 + 6 + 2 + 3, PixPro VOC 3 and C4 2); the 100-epoch rows stay
    # unfilled
    assert len(cells) == 28
    assert accounting(plan(cfg))["matched"] == 118 + len(cells)


def test_run_keys_name_this_projects_identifiers():
    """A misspelt key would never match and leave its row "not configured": every key is a valid run."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]
    released = schema["released"]["items"]["properties"]
    runs = schema["runs"]["items"]["properties"]
    for table in load_tables():
        for row in table.rows:
            keys = [row.key] if row.key else [row.gain.of, row.gain.over] if row.gain else []
            for key in keys:
                if key.method == "random-init":
                    assert key.arch in runs["arch"]["enum"] and key.data is None, (table.id, row.index)
                    continue
                fields = released if key.released else runs
                assert key.method in fields["method"]["enum"], (table.id, row.index, key)
                assert key.arch in fields["arch"]["enum"] and key.data in fields["data"]["enum"], (table.id, row.index)


def test_table_jobs_is_torch_free():
    # Its speed is a benchmark figure (benchmarks/dag_timing.py), not a timed test.
    code = ("import sys, time; from densessl.config import load_config; "
            "from densessl.report.paper_tables import table_jobs; "
            f"cfg = load_config([{str(REPO / 'config.yaml')!r}], preset='paper', check_settings=False); "
            "t = time.time(); jobs = table_jobs(cfg); dt = time.time() - t; "
            "print(dt, 'torch' in sys.modules, sum(map(len, jobs.values())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO / "src"), "DENSESSL_ROOT": str(REPO)}).stdout.split()
    assert out[1] == "False"
    assert int(out[2]) == sum(len(v) for v in pt.table_jobs(_paper()).values()) > 0


def test_smoke_preset_compares_nothing_with_the_papers():
    cfg = load_config([REPO / "config.yaml"], preset="smoke", root=REPO, check_settings=False)
    cells = plan(cfg)
    assert {c.status for c in cells} == {"unmatched", "not configured"}
    assert all("synthetic" in c.reason for c in cells if c.status == "not configured")


def test_a_row_names_exactly_one_mapping():
    raw = {"id": "t", "title": "t", "source": "s", "evaluation": "davis2017", "columns": ["JF_mean"],
           "rows": [{"method": "DINO", "arch": "ViT-S/16", "pretrain_data": "INet", "epochs": None,
                     "values": {"JF_mean": 61.8}}]}
    with pytest.raises(ConfigError, match=r"paper_tables.yaml: table 't', row 0 .*exactly one of 'run'"):
        parse_tables([raw])
    raw["rows"][0]["run"] = {"method": "dino", "arch": "vit-s16", "dataset": "imagenet"}
    with pytest.raises(ConfigError, match=r"run key fields \['dataset'\] are unknown"):
        parse_tables([raw])
    raw["rows"][0]["run"] = {"method": "dino", "arch": "vit-s16", "data": "imagenet"}
    raw["evaluation"] = "davis"
    with pytest.raises(ConfigError, match="evaluation 'davis' is not a protocol"):
        parse_tables([raw])


# ------------------------------------------------------------------------------------- the built report


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _config(tmp_path, seeds=None):
    """Paper-scale runs (real data) on one protocol: SelfPatch's Semantic FPN table."""
    runs = [{"method": m, "arch": "vit-s16", "data": "imagenet", **({"seeds": seeds} if seeds else {})}
            for m in ("dino", "selfpatch")]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "paper", "results_dir": str(tmp_path / "results"), "runs": runs,
                                    "evaluations": ["semfpn_ade20k"]}))
    return load_config([path], root=REPO, check_settings=False)


def _results(cfg, miou: dict[str, float]):
    for dataset in cfg.datasets:
        _write(cfg.data_manifest(dataset), {"fingerprint": {"content_sha256": "ab" * 32, "listing_sha256": None},
                                            "provenance": {"wall_s": 1.0}})
    for protocol, run in cfg.evaluation_jobs():
        if run.id in miou:
            _write(cfg.eval_metrics(protocol, run), {"metrics": {"mIoU": miou[run.id], "mAcc": 50.0, "aAcc": 70.0},
                                                     "provenance": {"wall_s": 1.0, "config_hash": cfg.hash,
                                                                    "git": {"commit": "c0ffee" * 6, "dirty": False},
                                                                    "inputs": {"backbone_sha256": "be" * 32,
                                                                               "data": {"content_sha256": "da" * 32}}}})


def test_a_table_with_a_missing_cell_says_not_run(tmp_path, monkeypatch):
    from densessl.report.build import build_report

    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    cfg = _config(tmp_path)
    _results(cfg, {"dino/vit-s16-imagenet": 38.0})  # SelfPatch's job has not run
    md = build_report(cfg).read_text()
    table = md.split("(`selfpatch_ade20k_semfpn`)")[1].split("\n### ")[0]
    assert "| DINO, ViT-S/16, ImageNet-1k | dino/vit-s16-imagenet | 38.00 / 38.3 (-0.30) |" in table
    assert "| DINO + SelfPatch, ViT-S/16, ImageNet-1k | selfpatch/vit-s16-imagenet | not run / 41.2 |" in table
    # the UperNet table's protocol is not configured here: its cells say so, with the reason
    upernet = md.split("(`selfpatch_ade20k_upernet`)")[1].split("\n### ")[0]
    assert "not configured / 42.3" in upernet and "upernet_ade20k is not in this configuration's evaluations" in upernet
    data = json.loads((cfg.report_dir / "tables.json").read_text())
    keys = {"table", "protocol", "run", "role", "network", "seed", "metric", "value", "published", "source"}
    assert all(keys <= set(c) for c in data["cells"] + data["results"])
    assert data["accounting"]["published"] == 334
    result = next(c for c in data["results"] if c["run"] == "dino/vit-s16-imagenet" and c["metric"] == "mIoU")
    assert (result["value"], result["published"], result["source"]) == (38.0, 38.3, "README, official repo alinlab/SelfPatch")
    cells = {(c["table"], c["run"]): c for c in data["cells"] if c["table"] == "selfpatch_ade20k_semfpn"}
    dino = cells[("selfpatch_ade20k_semfpn", "dino/vit-s16-imagenet")]
    assert (dino["status"], dino["value"], dino["published"], dino["role"], dino["network"], dino["seed"]) == (
        "ok", 38.0, 38.3, "pretrained", "vit-s16", 0)
    assert dino["delta"] == pytest.approx(-0.3)
    assert dino["provenance"]["checkpoint_sha256"] == "be" * 32 and dino["provenance"]["commit"] == "c0ffee" * 6
    sp = cells[("selfpatch_ade20k_semfpn", "selfpatch/vit-s16-imagenet")]
    assert (sp["status"], sp["value"], sp["network"]) == ("not run", None, "vit-s16.selfpatch")
    gain = next(g for g in data["gains"] if g["column"] == "delta_mIoU")
    assert gain["status"] == "not run" and gain["value"] is None
    html = (cfg.report_dir / "index.html").read_text()
    assert "not run / 41.2" in html and f"checkpoint {'be' * 6}" in html  # provenance in the cell's tooltip


def test_seed_replicas_show_mean_and_sd_and_test_the_claimed_gain(tmp_path, monkeypatch):
    from densessl.report.build import build_report

    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    cfg = _config(tmp_path, seeds=[0, 1, 2])
    assert [r.id for r in cfg.method_runs][:3] == [f"dino/vit-s16-imagenet-seed{s}" for s in (0, 1, 2)]
    assert cfg.pretrain_settings(cfg.method_runs[1])["train"]["seed"] == 1
    dino, sp = [37.9, 38.1, 38.3], [40.9, 41.0, 41.4]
    _results(cfg, {**{f"dino/vit-s16-imagenet-seed{s}": v for s, v in zip((0, 1, 2), dino)},
                   **{f"selfpatch/vit-s16-imagenet-seed{s}": v for s, v in zip((0, 1, 2), sp)}})
    md = build_report(cfg).read_text()
    assert "| 38.10 ± 0.20 (3 seeds) / 38.3 (-0.20) |" in md
    data = json.loads((cfg.report_dir / "tables.json").read_text())
    seeds = sorted(c["seed"] for c in data["cells"] if c["table"] == "selfpatch_ade20k_semfpn"
                   and c["run"].startswith("dino/"))
    assert seeds == [0, 1, 2]
    gain = next(g for g in data["gains"] if g["column"] == "delta_mIoU")
    assert gain["value"] == pytest.approx(41.1 - 38.1) and gain["published"] == 2.9
    assert gain["verdict"] == "reproduced beyond seed noise" and gain["p_value"] < 0.05
    assert "Welch" in gain["test"] and len(gain["of"]) == len(gain["over"]) == 3
    assert "reproduced beyond seed noise" in md


def test_gain_verdicts():
    noisy_of, noisy_over = RowStat((40.0, 44.0, 38.0), ("a",) * 3, "ok"), RowStat((39.0, 41.0, 43.0), ("b",) * 3, "ok")
    assert gain_verdict(noisy_of, noisy_over, 2.9)[0] == "not beyond seed noise"
    worse = RowStat((36.0, 36.1, 36.2), ("a",) * 3, "ok")
    assert gain_verdict(worse, noisy_over, 2.9)[0] == "reversed beyond seed noise"
    one = RowStat((41.0,), ("a",), "ok")
    assert gain_verdict(one, noisy_over, 2.9)[0].startswith("one seed per row")
