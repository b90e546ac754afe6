"""`densessl plan` and `densessl status`: the counts on the paper preset, and a partly finished smoke results
folder built from the files finished, running and failed jobs leave (fixtures, not reported numbers)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from densessl.config import load_config
from densessl.report.plan import build_plan
from densessl.report.status import build_status, incomplete_outputs, parse_duration

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DENSESSL_ROOT": str(ROOT)}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densessl", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def paper_plan():
    return build_plan(load_config([], preset="paper", root=ROOT, check_settings=False))


def test_paper_plan_published_counts(paper_plan):
    total = paper_plan.total.published
    assert total == {"total": 334, "matched": 241, "explained": 93}
    assert total["matched"] + total["explained"] == 334
    for key in ("total", "matched", "explained"):
        assert sum(t.published[key] for t in paper_plan.tables) == total[key]
    for t in paper_plan.tables:
        assert t.published["matched"] + t.published["explained"] == t.published["total"]


def test_paper_plan_jobs_and_sums(paper_plan):
    # each table's jobs are closed under their inputs, and the total counts a shared job once
    table_jobs = {j for t in paper_plan.tables for j in t.jobs}
    assert set(paper_plan.total.jobs) == table_jobs
    assert len(paper_plan.total.jobs) < sum(len(t.jobs) for t in paper_plan.tables)
    for t in paper_plan.tables:
        for j in t.jobs:
            assert set(paper_plan.jobs[j].needs) <= set(t.jobs)
    gtsa = next(t for t in paper_plan.tables if t.id == "gtsa_coco_maskrcnn")
    assert "pretrain gtsa/vit-s16-coco" in gtsa.jobs and "data coco" in gtsa.jobs
    # GPU-hours: the sum of the jobs with a figure; the rest counted, never guessed
    known = [paper_plan.jobs[j] for j in paper_plan.total.jobs if paper_plan.jobs[j].gpu_hours is not None]
    assert paper_plan.total.gpu_hours == pytest.approx(sum(j.gpu_hours for j in known))
    unknown = [paper_plan.jobs[j] for j in paper_plan.total.jobs if paper_plan.jobs[j].gpu_hours is None]
    assert paper_plan.total.gpu_hours_unknown_jobs == len(unknown) > 0
    assert all(j.source.startswith("no measured figure") for j in unknown)
    dino = paper_plan.jobs["pretrain dino/vit-s16-imagenet"]
    assert dino.gpu_hours == pytest.approx(1281167 * 100 / 563 / 3600)
    assert "benchmarks/train_step.py" in dino.source
    assert paper_plan.jobs["data imagenet"].disk_bytes > 1.4e11  # the published archive sizes
    assert paper_plan.total.disk_bytes == sum(paper_plan.jobs[j].disk_bytes for j in paper_plan.total.jobs)


def test_plan_cli_json_schema_and_no_torch(tmp_path):
    code = ("import sys, runpy; sys.argv = ['densessl', 'plan', '--preset', 'paper', '--json']\n"
            "from densessl.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'plan imported torch'\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["schema"] == "densessl.plan/1"
    for group in out["tables"] + [out["total"]]:
        assert {"jobs", "gpu_hours", "gpu_hours_unknown_jobs", "disk_bytes", "published_total", "published_matched",
                "published_explained"} <= set(group)
    assert out["total"]["published_matched"] + out["total"]["published_explained"] == 334


def test_smoke_plan_groups_by_protocol(tmp_path):
    cfg = load_config([], preset="smoke", root=ROOT, check_settings=False)
    smoke = build_plan(cfg)
    assert all(not t.jobs for t in smoke.tables)  # synthetic data: no published cell has a job
    assert smoke.total.published["matched"] == 0
    evaluations = [j for j in smoke.dag_total.jobs if smoke.jobs[j].kind == "evaluate"]
    assert len(evaluations) == len(cfg.evaluation_jobs())
    for run in cfg.pretrain_runs:
        job = smoke.jobs[f"pretrain {run.id}"]
        assert job.gpu_hours is None and job.source.startswith("no measured figure")
    assert smoke.jobs["data coco"].disk_source.startswith("synthetic")
    text = _cli("plan", "--preset", "smoke", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "left out of the sums" in text.stdout and "patchseg_coco" in text.stdout


# ------------------------------------------------------------------------------------------------ status


def _write(path: Path, text: str = "x", age: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if age:
        t = time.time() - age
        os.utime(path, (t, t))


@pytest.fixture
def smoke_folder(tmp_path):
    """A smoke results folder: run A pretrained, converted and evaluated on patchseg_coco; run B pretraining
    (progress lines, a live lock held by this process); run C's pretraining failed an hour ago."""
    (tmp_path / "config.yaml").write_text(f"preset: smoke\nresults_dir: {tmp_path / 'results'}\n")
    cfg = load_config([tmp_path / "config.yaml"], root=ROOT, check_settings=False)
    protocol = "patchseg_coco"
    a, b, c = [r for r in cfg.protocol_runs(protocol) if r in cfg.pretrain_runs][:3]
    res = cfg.results
    _write(res / "data" / a.data / "manifest.json", "{}")
    _write(cfg.data_manifest("coco"), "{}")
    for path in (cfg.final_checkpoint(a), cfg.backbone(a), cfg.eval_metrics(protocol, a)):
        _write(path)
    log_b = res / "logs" / "pretrain" / b.method / f"{b.name}.log"
    _write(log_b, "pretrain dino step 10/100 (10.0 %) · 3.1 it/s · elapsed 10s · ETA 2h00m\n"
                  "pretrain dino step 50/100 (50.0 %) · 3.1 it/s · elapsed 1m00s · ETA 1h00m · epoch 3/10\n")
    lock = cfg.pretrain_dir(b) / ".densessl.lock"
    _write(lock, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}), age=3600)
    _write(res / "logs" / "pretrain" / c.method / f"{c.name}.log",
           "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n", age=3600)
    return tmp_path, cfg, protocol, (a, b, c)


def test_status_counts_and_eta(smoke_folder):
    tmp_path, cfg, protocol, (a, b, c) = smoke_folder
    status = build_status(cfg)
    jobs = status.jobs
    assert jobs[f"pretrain {a.id}"].state == "done"
    assert jobs[f"evaluate {protocol} {a.id}"].state == "done"
    assert jobs[f"pretrain {b.id}"].state == "running"
    assert jobs[f"pretrain {b.id}"].reason == "live run lock"
    assert jobs[f"pretrain {c.id}"].state == "failed"
    assert jobs[f"pretrain {c.id}"].reason.endswith(": RuntimeError: boom")  # the exception, after the log's path
    assert str(cfg.results / "logs" / "pretrain" / c.method) in jobs[f"pretrain {c.id}"].reason
    group = next(g for g in status.protocols if g.id == protocol)
    n = len(cfg.protocol_runs(protocol))
    assert group.counts == {"done": 1, "running": 1, "failed": 1, "pending": n - 3}
    # the running pretraining's newest ETA (1 h, written just now); pending smoke jobs have no figure
    assert 3500 < group.eta_s <= 3600
    assert group.eta_unknown_jobs > 0
    # every evaluation of the DAG is counted once in the total
    assert sum(status.total.counts.values()) == len(cfg.evaluation_jobs())
    assert status.total.counts["done"] == 1
    # smoke: no published cell has a job (synthetic data)
    assert all(sum(t.counts.values()) == 0 for t in status.tables)
    # a cell whose metrics exist is done though its checkpoint is gone (a copied results folder)
    cfg.final_checkpoint(a).unlink()
    again = build_status(cfg)
    assert again.jobs[f"pretrain {a.id}"].state == "pending"
    assert next(g for g in again.protocols if g.id == protocol).counts == group.counts


def test_status_dead_lock_and_incomplete_marker(smoke_folder):
    tmp_path, cfg, protocol, (a, b, c) = smoke_folder
    lock = cfg.pretrain_dir(b) / ".densessl.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    log_b = cfg.results / "logs" / "pretrain" / b.method / f"{b.name}.log"
    t = time.time() - 3600
    os.utime(log_b, (t, t))
    # Snakemake marks a's metrics incomplete (it was being rewritten): not done
    metrics = cfg.eval_metrics(protocol, a)
    name = base64.urlsafe_b64encode(str(metrics).encode()).decode()
    _write(tmp_path / ".snakemake" / "incomplete" / name, "{}")
    assert metrics.resolve() in incomplete_outputs(tmp_path)
    status = build_status(cfg)
    assert status.jobs[f"pretrain {b.id}"].state == "pending"
    assert status.jobs[f"evaluate {protocol} {a.id}"].state == "pending"


def test_status_reads_a_launched_runs_submitit_log(smoke_folder):
    tmp_path, cfg, protocol, (a, b, c) = smoke_folder
    (cfg.pretrain_dir(b) / ".densessl.lock").unlink()
    log_b = cfg.results / "logs" / "pretrain" / b.method / f"{b.name}.log"
    t = time.time() - 7200
    os.utime(log_b, (t, t))
    _write(cfg.pretrain_dir(b) / "submitit" / "123" / "123_0_log.err",
           "pretrain dino step 90/100 (90.0 %) · 3.1 it/s · elapsed 9m00s · ETA 10m00s\n")
    state = build_status(cfg).jobs[f"pretrain {b.id}"]
    assert state.state == "running" and state.reason == "log written recently"
    assert 500 < state.eta_s <= 600


def test_status_cli(smoke_folder):
    tmp_path, cfg, protocol, _ = smoke_folder
    code = ("import sys\nfrom densessl.cli import main\nrc = main(['status', '--json'])\n"
            "assert 'torch' not in sys.modules, 'status imported torch'\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["schema"] == "densessl.status/1"
    group = next(g for g in out["protocols"] if g["id"] == protocol)
    assert (group["done"], group["running"], group["failed"]) == (1, 1, 1)
    text = _cli("status", cwd=tmp_path)
    assert text.returncode == 0 and "failed jobs:" in text.stdout and protocol in text.stdout


def test_status_missing_folder(tmp_path):
    done = _cli("status", "--preset", "smoke", "--results", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0] and "--results" in lines[0]


def test_parse_duration():
    assert parse_duration("4h21m") == 4 * 3600 + 21 * 60
    assert parse_duration("3d04h") == 3 * 86400 + 4 * 3600
    assert parse_duration("6m32s") == 392 and parse_duration("42s") == 42
    assert parse_duration("unknown") is None
