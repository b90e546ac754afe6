"""Multi-process pretraining on a real SLURM cluster (the loopback cluster of tests/test_slurm.py): a run planned
on 2 processes is one job of 2 srun tasks (gloo on CPU) started by the stage itself inside the allocation, and
survives a SIGTERM to its tasks as a single process does; the same run through `python -m densessl launch`
(submitit) is requeued by submitit and resumes from the checkpoint.

Opt-in like tests/test_slurm.py (`make test-slurm`); the submitit test also skips when submitit is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_slurm import _jobs, _wait, slurm_env  # noqa: F401  (slurm_env is the module-scoped cluster fixture)

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("DENSESSL_TEST_SLURM") != "1",
                       reason="opt-in: `make test-slurm` (starts a one-node SLURM cluster on loopback)"),
]

RUN = "dino/vit-tiny-p8-imagenet"
STEPS = 60  # 16 tiny images, 8 per step (2 tasks x 4): 2 steps per epoch, 30 epochs
CONFIG = {
    "results_dir": "results",
    "threads": 1,
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
    "random_init_seeds": [],
    "baselines": {"supervised_reference": []},
    "evaluations": [],
    "data": {"synthetic_size": "tiny"},
    "pretrain": {"dino": {"train": {"epochs": 30, "batch_size": 8, "batch_size_per_gpu": 4, "nproc_per_node": 2,
                                    "num_workers": 0, "checkpoint_every_steps": 2, "log_every_steps": 1}}},
}


def _preempt_once(env: dict[str, str], checkpoint: Path, marker: str, signalled: list[str]) -> threading.Thread:
    """After the first checkpoint, SIGTERM every step of the running job, as SLURM's --signal=TERM@N does."""

    def watch() -> None:
        try:
            _wait(checkpoint.exists, 600, "the first checkpoint")
            job = next(j for j in _jobs(env) if marker in j[3] and j[1] == "RUNNING")
            subprocess.run(["scancel", "--signal=TERM", job[0]], env=env, check=True)
            signalled.append(job[0])
        except (TimeoutError, StopIteration) as exc:
            signalled.append(f"failed: {exc}")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _check_resumed_run(run_dir: Path, world: int) -> list[dict]:
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["event"] for a in attempts] == ["start", "preempted", "start", "finished"], attempts
    assert attempts[1]["signal"] == "SIGTERM" and attempts[2]["resumed"]
    assert attempts[2]["step"] == attempts[1]["step"] > 0 and attempts[3]["step"] == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))
    summary = json.loads((run_dir / "train_summary.json").read_text())
    plan = summary["batch_plan"]
    assert (plan["world"], plan["batch_size"], plan["batch_size_per_gpu"], plan["accumulation_steps"]) == (world, 8, 4, 1)
    assert summary["train_config"]["nproc_per_node"] == world and 0 < summary["steps_this_run"] < STEPS
    return attempts


@pytest.mark.timeout(900)
def test_two_task_pretraining_job_under_slurm(tmp_path: Path, slurm_env: dict[str, str]) -> None:  # noqa: F811
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    run_dir = tmp_path / "results/smoke/pretrain" / RUN
    signalled: list[str] = []
    watcher = _preempt_once(slurm_env, run_dir / "checkpoint.pt", "rule_pretrain", signalled)
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--profile", str(REPO / "slurm"),
         "--default-resources", "slurm_partition=debug", "mem_mb=1000", "cpus_per_task=1", "runtime=30",
         "--set-resources", "pretrain:cpus_per_task=1", "pretrain:mem_mb=1000",
         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
         "--seconds-between-status-checks", "2", "--latency-wait", "5", "--jobs", "2",
         str(run_dir / "final.pt")],
        env=slurm_env, capture_output=True, text=True, timeout=840)
    watcher.join(timeout=5)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert signalled and not signalled[0].startswith("failed"), signalled
    jobs = sorted((j for j in _jobs(slurm_env) if "rule_pretrain" in j[3]), key=lambda j: int(j[0]))
    assert [j[1] for j in jobs] == ["FAILED", "COMPLETED"] and jobs[0][0] == signalled[0], jobs
    shown = subprocess.run(["scontrol", "show", "job", "-o", jobs[1][0]], env=slurm_env, capture_output=True,
                           text=True, check=True).stdout
    assert "NumTasks=2" in shown and "NumNodes=1" in shown, shown  # one job, two tasks: the planned layout
    attempts = _check_resumed_run(run_dir, world=2)
    assert [a["slurm_job_id"] for a in attempts] == [jobs[0][0], jobs[0][0], jobs[1][0], jobs[1][0]]


@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed")
def test_the_same_run_through_densessl_launch(tmp_path: Path, slurm_env: dict[str, str]) -> None:  # noqa: F811
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    subprocess.run([sys.executable, "-m", "densessl", "data", "--config", "config.yaml", "--dataset", "imagenet"],
                   cwd=tmp_path, env={**slurm_env, "DENSESSL_ROOT": str(REPO)}, check=True, capture_output=True)
    run_dir = tmp_path / "results/smoke/pretrain" / RUN
    signalled: list[str] = []
    watcher = _preempt_once(slurm_env, run_dir / "checkpoint.pt", "submitit", signalled)
    launch = subprocess.run(
        [sys.executable, "-m", "densessl", "launch", "--config", "config.yaml", "--run", RUN, "--nodes", "1",
         "--gpus-per-node", "2", "--partition", "debug", "--cpus-per-gpu", "1", "--mem-mb-per-gpu", "500",
         "--wait"],
        cwd=tmp_path, env={**slurm_env, "DENSESSL_ROOT": str(REPO)}, capture_output=True, text=True, timeout=840)
    watcher.join(timeout=5)
    assert launch.returncode == 0, launch.stdout[-4000:] + launch.stderr[-4000:]
    assert signalled and not signalled[0].startswith("failed"), signalled
    attempts = _check_resumed_run(run_dir, world=2)
    # submitit requeues the same job id; the final weights are there as under Snakemake
    assert {a["slurm_job_id"] for a in attempts} == {signalled[0]}
    assert (run_dir / "final.pt").exists()
