"""The CPU line every DAG stage ends its log with, and its parser (benchmarks/smoke_jobs.py reads it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from densessl import cputime

REPO = Path(__file__).resolve().parents[1]


def test_cpu_line_round_trips() -> None:
    sum(i * i for i in range(200_000))  # some CPU after the mark
    cputime.mark("startup")
    record = cputime.parse_line(cputime.cpu_line("evaluate"))
    assert record is not None and record.stage == "evaluate"
    assert 0 < record.startup_s <= record.cpu_s
    assert abs(record.startup_s + record.work_s - record.cpu_s) < 0.02


def test_other_lines_are_not_records() -> None:
    assert cputime.parse_line("2026 densessl.train: step 3") is None
    assert cputime.parse_line("densessl cpu: stage=data") is None  # truncated


def test_a_failing_stage_ends_on_its_error_line_alone(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "densessl", "data", "--config", str(tmp_path / "missing.yaml"),
                           "--dataset", "coco"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    lines = [cputime.parse_line(line) for line in done.stderr.splitlines()]
    records = [r for r in lines if r is not None]
    assert records == [] and done.stderr.strip().splitlines()[-1].startswith("densessl data: error:"), done.stderr
