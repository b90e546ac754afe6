"""Put a preempted SLURM batch job back in the queue under its own job id, so a preemption costs no retry.

A stage that stops for a signal (the time-limit warning ``--signal=TERM@<s>``, a preemption's SIGTERM) saves its
state and exits with ``REQUEUE_EXIT_CODE``. Left at that, SLURM records the job FAILED and Snakemake's SLURM
executor spends one of its ``retries`` on a resubmission: a long run on a preemptible partition then fails
for good after a few preemptions. So, inside a SLURM job, the stage's top process first asks the controller
to requeue the job (``scontrol requeue $SLURM_JOB_ID``) and only then exits. The controller answers after it
has marked the job for requeue, so the exit that follows can no longer fail the job: the job's older record
becomes REQUEUED, a new record of the same id goes PENDING, and snakemake-executor-plugin-slurm, which polls
``sacct -X`` (newest record per id) or ``squeue``, sees a job that is pending or running, never a failure
(``check_active_jobs`` counts only BOOT_FAIL, CANCELLED, DEADLINE, FAILED, NODE_FAIL, OUT_OF_MEMORY, TIMEOUT
and ERROR). The requeued job runs the same command, which resumes from the newest complete checkpoint.

SLURM lets a job run again only after its credential lifetime (``AuthInfo=cred_expire``, 120 s by default), and
only batch jobs submitted requeueable (``sbatch --requeue``, what the profile's ``slurm-requeue: true`` adds, or
the cluster's ``JobRequeue=1`` default) can be requeued. A job that is no longer RUNNING is left alone: ``scancel``
marks it CANCELLED before its SIGTERM arrives, and SLURM would requeue even that, so the requeue would undo the
cancel. When the requeue is refused (an interactive ``srun``, ``--no-requeue``) or skipped, the stage exits 3 as
before and Snakemake treats the job as failed. ``DENSESSL_SLURM_REQUEUE=0`` turns the requeue off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

REQUEUE_ENV = "DENSESSL_SLURM_REQUEUE"  # "0": exit with the requeue code only, leave the retry to Snakemake


def job_state(scontrol: str, job: str, env: Mapping[str, str], timeout_s: float = 60.0) -> str | None:
    """The controller's ``JobState`` of ``job`` (RUNNING, CANCELLED, ...), None when it cannot say."""
    shown = subprocess.run([scontrol, "show", "job", "-o", job], env=dict(env), capture_output=True, text=True,
                           timeout=timeout_s)
    fields = dict(part.split("=", 1) for part in shown.stdout.split() if "=" in part)
    return fields.get("JobState") if shown.returncode == 0 else None


def requeue_slurm_job(env: Mapping[str, str] | None = None, timeout_s: float = 60.0) -> bool:
    """Requeue the SLURM job this process runs in; True if the controller accepted it.

    Call it once per job, from the process that exits with the requeue code after the state is saved (not
    from torchrun's workers). Outside SLURM, or when turned off, it does nothing and returns False."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job or env.get(REQUEUE_ENV, "1") == "0" or env.get("SLURM_PROCID", "0") != "0":
        return False  # outside SLURM, turned off, or one of several tasks of a step (task 0 speaks for them)
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        print(f"densessl: SLURM job {job}: no scontrol on PATH, cannot requeue; exiting for a Snakemake retry",
              file=sys.stderr)
        return False
    try:
        state = job_state(scontrol, job, env, timeout_s)
        if state != "RUNNING":
            # scancel marks the job CANCELLED before its SIGTERM arrives, and SLURM would requeue even a
            # cancelled job: only a job that is still running (a warning signal, a preemption's grace
            # signal) goes back to the queue, so that scancel stops a run for good
            print(f"densessl: SLURM job {job} is {state or 'unknown to scontrol'}, not requeued", file=sys.stderr)
            return False
        done = subprocess.run([scontrol, "requeue", job], env=dict(env), capture_output=True, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"densessl: SLURM job {job}: scontrol requeue failed ({exc}); exiting for a Snakemake retry",
              file=sys.stderr)
        return False
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        print(f"densessl: SLURM job {job}: requeue refused ({reason[-1] if reason else done.returncode}); "
              f"exiting for a Snakemake retry", file=sys.stderr)
        return False
    print(f"densessl: SLURM job {job} requeued (restart {int(env.get('SLURM_RESTART_COUNT', '0')) + 1}); it resumes "
          f"from its checkpoint under the same job id", file=sys.stderr, flush=True)
    return True


def run_cli(argv: list[str] | None = None) -> int:
    """``python -m densessl`` and the ``densessl`` command: the CLI, then the requeue of a stage that stopped
    for a signal inside a SLURM job. torchrun's workers (which run this too) leave it to their launcher, which
    exits with the same code once they are done."""
    from densessl.cli import main
    from densessl.train.launch import REQUEUE_EXIT_CODE, under_torchrun

    code = main(argv)
    if code == REQUEUE_EXIT_CODE and not under_torchrun():
        requeue_slurm_job()
    return code
