"""A stage that stopped for a signal inside a SLURM job requeues the job itself (``scontrol requeue``), so the
preemption spends no Snakemake retry; outside SLURM, refused or turned off it only exits 3. A fake
``scontrol`` on PATH records its arguments (the real one runs in tests/test_slurm.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from densessl import cli
from densessl.train import requeue
from densessl.train.launch import REQUEUE_EXIT_CODE


def _fake_scontrol(folder: Path, exit_code: int = 0, message: str = "", state: str = "RUNNING") -> dict[str, str]:
    """`scontrol show job -o N` answers JobState=<state>; `scontrol requeue N` is recorded and answers exit_code."""
    folder.mkdir(exist_ok=True)
    tool = folder / "scontrol"
    tool.write_text(f'#!/bin/sh\nif [ "$1" = show ]; then echo "JobId=$4 JobName=x JobState={state} Reason=None"; '
                    f'exit 0; fi\necho "$@" >> {folder}/calls\necho "{message}" >&2\nexit {exit_code}\n')
    tool.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def _calls(folder: Path) -> list[str]:
    path = folder / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_requeues_the_job_it_runs_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {**_fake_scontrol(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}
    assert requeue.requeue_slurm_job(env) is True
    assert _calls(tmp_path) == ["requeue 4242"]
    assert "SLURM job 4242 requeued (restart 2)" in capsys.readouterr().err


def test_a_refused_requeue_leaves_the_retry_to_snakemake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {**_fake_scontrol(tmp_path, 1, "Requested operation is presently disabled for job 7"), "SLURM_JOB_ID": "7"}
    assert requeue.requeue_slurm_job(env) is False
    assert "requeue refused (Requested operation is presently disabled for job 7)" in capsys.readouterr().err


def test_a_cancelled_job_is_not_requeued(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scancel marks the job CANCELLED before its SIGTERM reaches the stage: requeueing would undo the cancel."""
    env = {**_fake_scontrol(tmp_path, state="CANCELLED"), "SLURM_JOB_ID": "8"}
    assert requeue.requeue_slurm_job(env) is False
    assert _calls(tmp_path) == [] and "SLURM job 8 is CANCELLED, not requeued" in capsys.readouterr().err


def test_nothing_happens_outside_slurm_or_when_turned_off(tmp_path: Path) -> None:
    env = _fake_scontrol(tmp_path)
    assert requeue.requeue_slurm_job(env) is False
    assert requeue.requeue_slurm_job({**env, "SLURM_JOB_ID": "9", requeue.REQUEUE_ENV: "0"}) is False
    assert requeue.requeue_slurm_job({**env, "SLURM_JOB_ID": "9", "SLURM_PROCID": "3"}) is False
    assert _calls(tmp_path) == []


@pytest.mark.parametrize(("code", "torchrun_worker", "requeued"), [
    (REQUEUE_EXIT_CODE, False, True),   # the stage's top process after a signal
    (REQUEUE_EXIT_CODE, True, False),   # a torchrun worker: its launcher requeues once for all of them
    (0, False, False),
    (2, False, False),
])
def test_the_cli_requeues_only_a_stopped_stage_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                                    torchrun_worker: bool, requeued: bool) -> None:
    for key, value in {**_fake_scontrol(tmp_path), "SLURM_JOB_ID": "11"}.items():
        monkeypatch.setenv(key, value)
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", requeue.REQUEUE_ENV):
        monkeypatch.delenv(key, raising=False)
    if torchrun_worker:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(cli, "main", lambda argv=None: code)
    assert requeue.run_cli([]) == code
    assert _calls(tmp_path) == (["requeue 11"] if requeued else [])
