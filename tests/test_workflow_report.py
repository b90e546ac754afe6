"""`snakemake --report`: the workflow view with the report stage's outputs and every evaluation's metrics.json,
each with its caption (workflow/report/*.rst), built from a results folder whose files exist.

Snakemake's report needs the files marked with report() to exist, not a DAG it ran itself (a file without
Snakemake's metadata is listed with a warning), so the constructed folder of tests/report_project.py serves
and no stage runs (about 10 s)."""

from __future__ import annotations

import subprocess
import sys

import report_project
from conftest import REPO

from densessl.report.build import build_report


def test_snakemake_report_has_the_captions_and_the_workflow_description(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    cfg = report_project.make(tmp_path)
    build_report(cfg)
    out = tmp_path / "workflow.html"
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--report", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Report created" in run.stderr
    page = out.read_text()
    # workflow/report/workflow.rst, rendered with the preset
    assert "densessl reproduces dense self-supervised pretraining methods" in page
    assert "Preset <strong>smoke</strong>" in page
    # the report stage's four outputs, each with its caption
    for caption in ("as one self-contained HTML page", "as Markdown (what", "Every table cell of the report",
                    "The supervised-reference checks"):
        assert caption in page, caption
    # one entry per evaluation, captioned with its own protocol and run
    for protocol, run_ in cfg.evaluation_jobs():
        assert f"of protocol <strong>{protocol}</strong> on run\\n<strong>{run_.id}</strong>" in page
