"""The DAG through the SLURM profile on a real one-node SLURM cluster that the test starts on loopback.

A third test preempts a fine-tuning evaluation (the linear ADE20K decoder) under sbatch: it saves its training
state, requeues in place and the requeued run resumes from that state and completes.

Opt-in (`make test-slurm`, which installs Debian's SLURM daemons, slurmdbd, MariaDB and munge when they are
missing): it needs the daemons, root (slurmd starts job steps as the submitting user) and a few minutes.
`make test` skips it. The cluster (`tests/slurm_cluster.py`) has accounting (slurmdbd on MariaDB, so `sacct`
answers and the executor polls it) and two fake GPUs (gres on /dev/null).

What it runs is what a user runs: `snakemake --profile slurm` from the project root (the snakemake SLURM
executor: every rule an `sbatch` job, the rule itself an `srun` step inside it), with only the site-specific
resources overridden on the command line (partition, one fake GPU, small memory). Once its first
checkpoint exists, the pretraining job's steps get `scancel --signal=TERM` (what the profile's time-limit
warning and a preemption with GraceTime send); the job must requeue itself under its own job id, spending
none of Snakemake's retries. While it waits in the queue the test tears its newest checkpoint, so the requeued
run must fall back to `checkpoint.previous.pt`.

A second test submits a pretraining with a two-minute time limit and the warning `--signal=B:TERM@60` straight
to `sbatch` (no Snakemake: its start-up would eat the short limit): the job must requeue itself before the
limit and resume at the checkpointed step; a plain `scancel` afterwards must stop it for good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from slurm_cluster import CRED_EXPIRE_S, free_port, jobs, sacct, sbin, slurm_env, wait_for

__all__ = ["slurm_env"]  # the fixture, for other SLURM test modules: `from test_slurm import slurm_env`

# names this module exported before the cluster moved to slurm_cluster.py
_free_port, _jobs, _wait = free_port, jobs, wait_for
sbin = sbin

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("DENSESSL_TEST_SLURM") != "1",
                       reason="opt-in: `make test-slurm` (starts a one-node SLURM cluster on loopback)"),
]

CHECKPOINT_EVERY = 2
STEPS = 160  # 16 tiny images, 4 per step, 40 epochs
CONFIG = {
    "results_dir": "results",
    "threads": 1,
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
    "random_init_seeds": [0],
    "baselines": {"supervised_reference": []},  # the DINO run and its random init are what this test needs
    "evaluations": ["davis2017"],
    "data": {"synthetic_size": "tiny"},
    "pretrain": {"dino": {"train": {"epochs": 40, "batch_size_per_gpu": 4, "num_workers": 0,
                                    "checkpoint_every_steps": CHECKPOINT_EVERY, "log_every_steps": 1}}},
}


def test_gpu_requests_are_scheduled_on_the_fake_gres(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    out = tmp_path / "gpu.out"
    job = subprocess.run(["sbatch", "--parsable", "--gpus=1", "-o", str(out), "--wrap",
                          "echo CUDA=$CUDA_VISIBLE_DEVICES JOB_GPUS=$SLURM_JOB_GPUS ON_NODE=$SLURM_GPUS_ON_NODE"],
                         env=slurm_env, capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: sacct(slurm_env, job) and sacct(slurm_env, job)[0]["State"] == "COMPLETED", 60,
             "the GPU job to complete")
    assert out.read_text().split() == ["CUDA=0", "JOB_GPUS=0", "ON_NODE=1"]
    tres = subprocess.run(["sacct", "-X", "-n", "-j", job, "-o", "AllocTRES%80"], env=slurm_env,
                          capture_output=True, text=True, check=True).stdout
    assert "gres/gpu=1" in tres, tres
    # more GPUs than the node has: refused at submission, not left pending forever
    refused = subprocess.run(["sbatch", "--gpus=3", "--wrap", "true"], env=slurm_env, capture_output=True, text=True)
    assert refused.returncode != 0 and "not available" in refused.stderr, refused.stderr


def _attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _state(env: dict[str, str], job: str) -> str:
    return next((j[1] for j in jobs(env) if j[0] == job), "")


def _dag_jobs(env: dict[str, str]) -> list[dict[str, str]]:
    """Accounting records of the jobs Snakemake submitted (named after its run id, not `wrap`)."""
    return [r for r in sacct(env) if r["JobName"] != "wrap"]


@pytest.mark.timeout(900)
def test_dag_on_slurm_survives_a_preemption_without_a_retry(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    pretrain_dir = tmp_path / "results/smoke/pretrain/dino/vit-tiny-p8-imagenet"
    events: list[str] = []

    def preempt_once() -> None:
        """At the first checkpoint, signal the job's steps as a preemption would; once the job is back in
        the queue, tear its newest checkpoint (the previous one is what the requeued run must use)."""
        try:
            wait_for(lambda: (pretrain_dir / "checkpoint.pt").exists(), 700, "the first checkpoint", every=0.2)
            job = next(j[0] for j in jobs(slurm_env) if "rule_pretrain" in j[3] and j[1] == "RUNNING")
            subprocess.run(["scancel", "--signal=TERM", job], env=slurm_env, check=True)
            events.append(job)
            wait_for(lambda: _state(slurm_env, job) == "PENDING", 120, "the job to be requeued", every=0.1)
            newest = pretrain_dir / "checkpoint.pt"
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn, as by a dying node
            events.append(f"torn while {_state(slurm_env, job)}")
        except (TimeoutError, StopIteration) as exc:
            events.append(f"failed: {exc!r}")

    watcher = threading.Thread(target=preempt_once, daemon=True)
    watcher.start()
    started = time.time()
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--profile", "slurm",  # literally, from the project root
         # site-specific resources only; everything else is the shipped profile
         "--default-resources", "slurm_partition=debug", "mem_mb=1000", "cpus_per_task=1", "runtime=30",
         "--set-resources", "pretrain:gpu=1", "pretrain:cpus_per_task=1", "pretrain:mem_mb=2000", "evaluate:gpu=0",
         "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
         "--latency-wait", "5", "--jobs", "2"],
        env=slurm_env, capture_output=True, text=True, timeout=840, cwd=REPO)
    watcher.join(timeout=5)
    log = run.stdout[-6000:] + run.stderr[-6000:]
    print(f"the DAG on SLURM: {time.time() - started:.0f} s")
    assert run.returncode == 0, log
    assert len(events) == 2 and events[1] == "torn while PENDING", (events, log)

    # every rule ran as its own sbatch job, polled through sacct, and completed; the pretraining as ONE job,
    # requeued in place: Snakemake never saw it fail, so no retry was spent
    pretrain_job = events[0]
    rules = {part for j in jobs(slurm_env) for part in Path(j[3].strip()).parts if part.startswith("rule_")}
    assert {"rule_data", "rule_pretrain", "rule_convert", "rule_evaluate", "rule_report"} <= rules, rules
    assert {j[0] for j in jobs(slurm_env) if "rule_pretrain" in j[3]} == {pretrain_job}
    records = _dag_jobs(slurm_env)
    assert len(records) >= 8 and all(r["State"] == "COMPLETED" for r in records), records
    history = [r["State"] for r in sacct(slurm_env, pretrain_job, duplicates=True)]
    assert history == ["REQUEUED", "COMPLETED"], history
    assert "Trying to restart" not in run.stderr and "Error in rule pretrain" not in run.stderr, log
    tres = subprocess.run(["sacct", "-X", "-n", "-j", pretrain_job, "-o", "AllocTRES%80"], env=slurm_env,
                          capture_output=True, text=True, check=True).stdout
    assert "gres/gpu=1" in tres, tres  # scheduled on the fake GPU

    # the run's own history: preempted by SIGTERM, resumed in the same job from the PREVIOUS checkpoint
    attempts = _attempts(pretrain_dir)
    assert [(a["event"], a["slurm_job_id"]) for a in attempts] == [
        ("start", pretrain_job), ("preempted", pretrain_job), ("start", pretrain_job), ("finished", pretrain_job)]
    stop, resumed = attempts[1], attempts[2]
    assert stop["signal"] == "SIGTERM" and resumed["checkpoint"] == "checkpoint.previous.pt", attempts
    # the same final step as an uninterrupted run, every step logged once, at most one checkpoint interval
    # trained twice (the steps between the previous checkpoint and the torn one)
    recomputed = stop["step"] - resumed["step"]
    assert 0 < recomputed <= CHECKPOINT_EVERY and attempts[3]["step"] == STEPS, attempts
    steps = [json.loads(line)["step"] for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((pretrain_dir / "train_summary.json").read_text())
    assert steps == list(range(STEPS)) and summary["steps"] == STEPS, summary
    assert summary["steps_this_run"] == STEPS - resumed["step"], summary
    assert (tmp_path / "results/smoke/report/report.md").exists()


@pytest.mark.timeout(600)
def test_time_limit_warning_requeues_and_resumes(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    """A job with a two-minute limit and the warning 60 s before it: the run checkpoints and requeues itself
    before the limit and resumes at the checkpointed step in the same job. Then a plain `scancel`: the run
    still checkpoints, but a cancelled job is not requeued, so it stays stopped."""
    config = {**CONFIG, "pretrain": {"dino": {"train": {**CONFIG["pretrain"]["dino"]["train"], "epochs": 500}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "densessl"]
    stage_env = {**slurm_env, "DENSESSL_ROOT": str(REPO), "PYTHONPATH": str(REPO / "src")}
    args = ["--config", "config.yaml", "--preset", "smoke"]
    subprocess.run([*cli, "data", *args, "--dataset", "imagenet"], cwd=tmp_path, env=stage_env, check=True,
                   capture_output=True)
    command = " ".join([*cli, "pretrain", *args, "--run", "dino/vit-tiny-p8-imagenet", "--threads", "1"])
    started = time.time()
    # with --wrap the stage is the batch shell itself (exec), hence B: (the profile signals the job step)
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "-t", "2", "--signal=B:TERM@60", "--gpus=1",
                          "-c", "1", "--open-mode=append", "-o", str(tmp_path / "job.log"), "-D", str(tmp_path),
                          "--wrap", f"exec {command}"],
                         env=stage_env, capture_output=True, text=True, check=True).stdout.strip()
    run_dir = tmp_path / "results/smoke/pretrain/dino/vit-tiny-p8-imagenet"

    def starts() -> list[dict]:
        return [a for a in _attempts(run_dir) if a["event"] == "start"]

    wait_for(lambda: len(starts()) >= 2, 400, "the requeued run to start")
    print(f"time-limit warning, requeue and restart: {time.time() - started:.0f} s")
    resumed_at = starts()[1]["step"]
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: len(metrics.read_text().splitlines()) > resumed_at + CHECKPOINT_EVERY, 120, "training to go on")
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    wait_for(lambda: [r["State"] for r in sacct(slurm_env, job)] == ["CANCELLED"], 120, "the job to be cancelled")
    wait_for(lambda: _attempts(run_dir)[-1]["event"] != "start", 60, "the cancelled run's checkpoint")
    time.sleep(2 * CRED_EXPIRE_S)  # past the requeue delay: a requeued job would be running again by now

    history = [r["State"] for r in sacct(slurm_env, job, duplicates=True)]
    log = (tmp_path / "job.log").read_text()[-3000:]
    assert history == ["REQUEUED", "CANCELLED"], (history, log)
    attempts = _attempts(run_dir)
    assert [a["event"] for a in attempts] == ["start", "preempted", "start", "preempted"], (attempts, log)
    assert {a["slurm_job_id"] for a in attempts} == {job}
    warned, resumed = attempts[1], attempts[2]
    assert warned["signal"] == "SIGTERM" and warned["step"] > 0
    assert resumed["step"] == warned["step"] and resumed["checkpoint"] == "checkpoint.pt"  # nothing lost
    # scancel: the controller holds the job as CANCELLED/COMPLETING when the stage asks
    assert f"SLURM job {job} requeued" in log and "not requeued" in log.split("requeued (restart 1)")[-1], log
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(attempts[-1]["step"]))  # every step once, across the requeue


@pytest.mark.timeout(600)
def test_a_preempted_evaluation_requeues_and_resumes_its_training_state(tmp_path: Path,
                                                                        slurm_env: dict[str, str]) -> None:
    """A fine-tuning evaluation (the linear ADE20K decoder) preempted under SLURM: the warning signal makes it save
    its training state and requeue the job in place; the requeued run resumes from that state and completes.
    `scancel --batch --signal=TERM` is what the evaluate rule's `--signal=TERM@180` delivers before the limit."""
    config = {**CONFIG, "evaluations": ["linear_ade20k"],
              "evaluate": {"linear_seg": {"iterations": 400, "checkpoint_every": 5, "num_workers": 0}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "densessl"]
    stage_env = {**slurm_env, "DENSESSL_ROOT": str(REPO), "PYTHONPATH": str(REPO / "src")}
    args = ["--config", "config.yaml", "--preset", "smoke"]
    run = "random-init/vit-tiny-p8-seed0"
    for stage in (["data", "--dataset", "ade20k"], ["convert", "--run", run]):
        subprocess.run([*cli, stage[0], *args, *stage[1:]], cwd=tmp_path, env=stage_env, check=True,
                       capture_output=True)
    command = " ".join([*cli, "evaluate", "linear_ade20k", *args, "--run", run, "--threads", "1"])
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "-c", "1", "--open-mode=append",
                          "-o", str(tmp_path / "job.log"), "-D", str(tmp_path), "--wrap", f"exec {command}"],
                         env=stage_env, capture_output=True, text=True, check=True).stdout.strip()
    out_dir = tmp_path / "results/smoke/eval/linear_ade20k" / run
    state = out_dir / "train_state.pt"
    wait_for(lambda: state.exists(), 300, "the evaluation's first training state", every=0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=slurm_env, check=True)
    wait_for(lambda: (out_dir / "metrics.json").exists(), 400, "the requeued evaluation to finish")
    wait_for(lambda: [r["State"] for r in sacct(slurm_env, job)] == ["COMPLETED"], 60, "the job to complete")

    log = (tmp_path / "job.log").read_text()
    history = [r["State"] for r in sacct(slurm_env, job, duplicates=True)]
    assert history == ["REQUEUED", "COMPLETED"], (history, log[-3000:])
    assert f"SLURM job {job} requeued" in log, log[-3000:]
    resumed = log.split("requeued (restart 1)")[-1]
    assert "resuming the saved training state" in resumed and "training from the start" not in resumed, log[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["protocol"] == "linear_ade20k" and "mIoU" in json.dumps(metrics), metrics
