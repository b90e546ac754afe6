"""The DAG through the SLURM profile on a real one-node SLURM cluster that the test starts on loopback.

Opt-in (`make test-slurm`, which installs Debian's slurm-wlm and munge when they are missing): it needs the
SLURM daemons, root (slurmd starts job steps as the submitting user) and a few minutes. `make test` skips it.

What it runs is what a user runs: `snakemake --profile workflow/profiles/slurm` (the snakemake SLURM
executor: every rule an `sbatch` job, the rule itself an `srun` step inside it), with only the site-specific
resources overridden on the command line (partition, no GPUs, small memory). Mid-pretraining the test sends
the job's steps SIGTERM, exactly what the profile's `--signal=TERM@180` makes SLURM send before a time limit:
the trainer must checkpoint and exit 3, Snakemake must resubmit the job (profile `retries`), and the new job
must resume from the checkpoint, so that the run ends with every step logged once.

The cluster lives in a temporary folder: its own munge key and socket, `slurm.conf`, state and spool folders,
free loopback ports. The snakemake executor strips every `SLURM_*` variable (`SLURM_CONF` included) from
the environment of the inner `srun`, which on a real cluster then reads /etc/slurm/slurm.conf; a two-line
`srun` on PATH that sets `SLURM_CONF` stands in for that file, so the test never writes outside its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "srun", "sinfo", "scontrol")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("DENSESSL_TEST_SLURM") != "1",
                       reason="opt-in: `make test-slurm` (starts a one-node SLURM cluster on loopback)"),
]


def sbin(name: str) -> str:
    """Debian installs the daemons in /usr/sbin, which a non-login root shell may not have on PATH."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        pytest.skip(f"SLURM not installed (missing {missing}); `make test-slurm` installs it")
    if os.geteuid() != 0:
        pytest.skip("slurmd needs root to start job steps")
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "munge", "bin"):
        (root / d).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.sock"
    subprocess.run([sbin("munged"), f"--key-file={key}", f"--socket={sock}", f"--pid-file={root}/munge/pid",
                    f"--log-file={root}/munge/log", f"--seed-file={root}/munge/seed", "--force"], check=True)
    ctld_port, slurmd_port = _free_port(), _free_port()
    user = "root"
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=densessl-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser={user}
SlurmdUser={user}
ReturnToService=2
MinJobAge=3600
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    shim = root / "bin" / "srun"
    shim.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sbin("slurmctld"), "-i"], env=env, check=True)
    subprocess.run([sbin("slurmd"), "-N", "localhost"], env=env, check=True)
    try:
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                              text=True).stdout, 30, "the node to come up idle")
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        pid = root / "munge" / "pid"
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], capture_output=True)


def _jobs(env: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(job id, state, exit code, stdout path) of every job the controller remembers (MinJobAge 1 h)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-O", "JobID:12,State:14,exit_code:8,STDOUT:400"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return [tuple(line.split(None, 3)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


CONFIG = {
    "results_dir": "results",
    "threads": 1,
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
    "random_init_seeds": [0],
    "baselines": {"supervised_reference": []},  # the DINO run and its random init are what this test needs
    "evaluations": ["davis2017"],
    "data": {"synthetic_size": "tiny"},
    # 16 tiny images, 4 per step: 160 steps, long enough to be interrupted, checkpointed every 2 steps
    "pretrain": {"dino": {"train": {"epochs": 40, "batch_size_per_gpu": 4, "num_workers": 0,
                                    "checkpoint_every_steps": 2, "log_every_steps": 1}}},
}


@pytest.mark.timeout(1500)
def test_dag_on_slurm_survives_a_preemption(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    pretrain_dir = tmp_path / "results/smoke/pretrain/dino/vit-tiny-p8-imagenet"
    signalled: list[str] = []

    def preempt_once() -> None:
        """Wait for the pretraining job's first checkpoint, then signal its steps as a time limit would."""
        try:
            _wait(lambda: (pretrain_dir / "checkpoint.pt").exists(), 600, "the first checkpoint")
            job = next(j for j in _jobs(slurm_env) if "rule_pretrain" in j[3] and j[1] == "RUNNING")
            subprocess.run(["scancel", "--signal=TERM", job[0]], env=slurm_env, check=True)
            signalled.append(job[0])
        except (TimeoutError, StopIteration) as exc:
            signalled.append(f"failed: {exc}")

    watcher = threading.Thread(target=preempt_once, daemon=True)
    watcher.start()
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--profile", str(REPO / "workflow/profiles/slurm"),
         # site-specific resources only; everything else is the shipped profile
         "--default-resources", "slurm_partition=debug", "mem_mb=1000", "cpus_per_task=1", "runtime=30",
         "--set-resources", "pretrain:gpu=0", "pretrain:cpus_per_task=1", "pretrain:mem_mb=2000",
         "evaluate:gpu=0",
         # no slurmdbd here, so no sacct; squeue sees finished jobs for MinJobAge
         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
         "--seconds-between-status-checks", "2", "--latency-wait", "5", "--jobs", "2"],
        env=slurm_env, capture_output=True, text=True, timeout=1400)
    watcher.join(timeout=5)
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    assert signalled and not signalled[0].startswith("failed"), signalled

    # every rule ran as its own sbatch job; the pretraining twice: preempted (exit 3), then resumed
    jobs = _jobs(slurm_env)
    pretrain_jobs = sorted((j for j in jobs if "rule_pretrain" in j[3]), key=lambda j: int(j[0]))
    assert [j[0] for j in pretrain_jobs][:1] == signalled, (pretrain_jobs, signalled)
    assert len(pretrain_jobs) == 2, pretrain_jobs
    assert pretrain_jobs[0][1] == "FAILED" and pretrain_jobs[1][1] == "COMPLETED", pretrain_jobs
    # the run's own history (Snakemake deletes a failed job's log before the retry): preempted by SIGTERM in
    # the first job, resumed at that step in the second
    attempts = [json.loads(line) for line in (pretrain_dir / "attempts.jsonl").read_text().splitlines()]
    first, second = pretrain_jobs[0][0], pretrain_jobs[1][0]
    assert [(r["event"], r["slurm_job_id"]) for r in attempts] == [
        ("start", first), ("preempted", first), ("start", second), ("finished", second)], attempts
    assert attempts[1]["signal"] == "SIGTERM" and attempts[2]["resumed"]
    assert attempts[2]["step"] == attempts[1]["step"] > 0 and attempts[3]["step"] == 160
    rules = {part for j in jobs for part in Path(j[3].strip()).parts if part.startswith("rule_")}
    assert {"rule_data", "rule_pretrain", "rule_convert", "rule_evaluate", "rule_report"} <= rules, rules

    # the resumed run continued: every step logged exactly once, and the second job trained only the rest
    steps = [json.loads(line)["step"] for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((pretrain_dir / "train_summary.json").read_text())
    assert steps == list(range(summary["steps"])) and summary["steps"] == 160
    assert 0 < summary["steps_this_run"] < 160, summary
    assert (tmp_path / "results/smoke/report/report.md").exists()
