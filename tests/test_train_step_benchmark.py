"""benchmarks/train_step.py at smoke scale, one step of one method on the CPU: the JSON record's schema (no
timing is asserted; the figures are whatever this machine gives)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_record_has_every_mode_and_field(tmp_path: Path) -> None:
    record_path = tmp_path / "record.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--scale", "smoke",
                           "--steps", "1", "--repeats", "1", "--warmup", "1", "--batch", "4", "--workers", "0",
                           "--methods", "dino", "--archs", "vit-tiny-p8", "--device", "cpu",
                           "--record", str(record_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(record_path.read_text())
    assert record["device"] == "cpu" and record["date"]
    assert set(record["versions"]) == {"torch", "cuda", "densessl_commit"}
    rows = record["measurements"]
    assert [(r["method"], r["arch"], r["mode"]) for r in rows] == [
        ("dino", "vit-tiny-p8", m) for m in ("step", "end_to_end", "official")]
    for r in rows:
        assert set(r) >= {"method", "arch", "mode", "images_per_s", "mfu", "ratio_vs_official"}
        assert r["images_per_s"] > 0 and r["mfu"] is None  # no peak on the CPU
        assert r["flops_per_image"] > 0
    assert rows[-1]["ratio_vs_official"] == 1.0
    assert "dino" in done.stdout and "official" in done.stdout
