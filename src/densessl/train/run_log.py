"""A pretraining run's logs: metrics as JSONL and TensorBoard scalars, and the attempts record (rank 0 only).

Both JSONL files are appended one line per record, so a run killed mid-write leaves at most one torn last
line; readers skip such a line (:func:`read_jsonl`) and resume rewrites the metrics file without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from densessl.errors import ConfigError
from densessl.io import atomic_path

METRICS_NAME = "metrics.jsonl"
ATTEMPTS_NAME = "attempts.jsonl"
TENSORBOARD_DIR = "tensorboard"
log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; lines that are not a JSON object (a torn last line) are skipped with a
    warning naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s:%d: not a complete JSON record (a write cut short); skipping it", path, number)
    return records


class RunLog:
    def __init__(self, out_dir: Path, rank: int, tensorboard: bool) -> None:
        self.out_dir, self.rank, self.tensorboard = out_dir, rank, tensorboard
        self._writer: Any = None

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records of steps before ``step`` (they are recomputed, identically, on resume) and drop
        torn lines, so the file again holds one complete record per line."""
        path = self.out_dir / METRICS_NAME
        if self.rank != 0 or not path.exists():
            return
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        keep = [json.dumps(r) for r in read_jsonl(path) if r.get("step", -1) < step]
        if len(keep) != len(lines):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def open_tensorboard(self, step: int) -> None:
        if self.rank != 0 or not self.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"train.tensorboard: true needs the tensorboard package ({exc}); install it "
                              f"(pip install tensorboard) or set train.tensorboard: false") from exc
        # purge_step hides events a killed run logged after its last checkpoint (they are logged again)
        self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR),
                                     purge_step=step if step > 0 else None)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def attempt(self, record: dict[str, Any]) -> None:
        """Append one line to ``attempts.jsonl``: when each attempt of the run started (resumed or not) and how
        it ended. Why a file of its own: the stage log belongs to Snakemake, which deletes it before re-running
        a failed (e.g. preempted, exit 3) job, so a requeued run's history would otherwise be lost."""
        if self.rank != 0:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record,
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        with open(self.out_dir / ATTEMPTS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / METRICS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, global_step=record["step"])


def last_attempt(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / ATTEMPTS_NAME
    records = read_jsonl(path) if path.is_file() else []
    return records[-1] if records else None
