"""``python -m densessl launch --run RUN``: one pretraining run submitted to SLURM through submitit, for users who
do not run Snakemake.

What it submits: ``nodes × gpus_per_node`` tasks (submitit's ``srun``, one task per GPU), each running
``PretrainJob``, which sets torch.distributed's variables from ``submitit.JobEnvironment`` (rank, local rank,
world, the first host of the allocation as the rendezvous) and runs the pretrain stage in-process. The layout is
checked by the GPU-count rule and the time limit comes from the compute plan, as under Snakemake
(``densessl.launch.resources``).

Requeue: submitit's preemption signal is set to SIGTERM (``SUBMITIT_PREEMPT_SIGNAL``, read by submitit when it is
imported, here and in the job), which SLURM sends ``slurm.signal_seconds`` before the time limit
(``--signal=TERM@N``) and on preemption. Inside the training loop every rank's trainer takes it: it finishes
the step, writes the checkpoint and raises ``Preempted``. Rank 0 then hands over to submitit's own handler,
which calls ``PretrainJob.checkpoint`` (the same job, resuming) and requeues the job (``scontrol requeue``); the
requeued job resumes from the checkpoint through the stage's usual resume path. Outside the loop (start-up)
submitit's handler acts at once: nothing is lost but the start-up. Each requeue at a time limit uses one of
``max_num_timeout`` (the planned segments plus two); preemptions do not count.

submitit is imported only here, when a job is submitted or run (``pyproject.toml`` lists it; ``--dry-run``
needs nothing but the configuration).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densessl.errors import ConfigError

PREEMPT_SIGNAL = "TERM"  # the trainer's stop signal (train/signals.py), given to submitit
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def _submitit() -> Any:
    os.environ[PREEMPT_SIGNAL_ENV] = PREEMPT_SIGNAL  # before submitit's import: it reads it once
    try:
        import submitit
    except ImportError:
        raise ConfigError("python -m densessl launch needs submitit (a dependency in pyproject.toml): install the "
                          "project environment (make env), or `pip install submitit`") from None
    return submitit


@dataclass
class PretrainJob:
    """The callable every task runs; picklable (submitit stores it and runs it again after a requeue)."""

    config_files: list[str]
    preset: str | None
    run_id: str
    workdir: str
    root: str
    resume: str = "auto"
    threads: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> str:
        submitit = _submitit()
        job = submitit.JobEnvironment()
        os.chdir(self.workdir)
        os.environ.update(self.env)
        os.environ.update({
            "DENSESSL_ROOT": self.root, "RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank),
            "WORLD_SIZE": str(job.num_tasks), "LOCAL_WORLD_SIZE": str(max(1, job.num_tasks // job.num_nodes)),
            "GROUP_RANK": str(job.node), "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": str(20000 + int(job.raw_job_id) % 20000),  # one port per job, the same on every node
        })
        import torch

        from densessl.config import load_config
        from densessl.runlock import run_lock
        from densessl.stages.pretrain import run_pretrain
        from densessl.train.launch import REQUEUE_EXIT_CODE
        from densessl.train.trainer import Preempted

        cfg = load_config(self.config_files, preset=self.preset, check_settings=False)
        torch.set_num_threads(self.threads or cfg.threads)
        try:
            if job.global_rank == 0:
                with run_lock(cfg.pretrain_dir(cfg.run(self.run_id)), "run"):
                    return str(run_pretrain(cfg, self.run_id, self.resume))
            return str(run_pretrain(cfg, self.run_id, self.resume))
        except Preempted as exc:
            print(f"densessl launch: {exc}; requeueing", file=sys.stderr, flush=True)
            if job.global_rank == 0:  # submitit's handler: checkpoint() below, scontrol requeue, exit
                signal.raise_signal(getattr(signal, f"SIG{PREEMPT_SIGNAL}"))
                time.sleep(60)
            sys.exit(REQUEUE_EXIT_CODE)  # no result file: submitit waits for the requeued job

    def checkpoint(self) -> Any:
        """submitit's hook at the preemption signal: run the same job again, resuming from its checkpoint."""
        submitit = _submitit()
        again = PretrainJob(self.config_files, self.preset, self.run_id, self.workdir, self.root, "auto",
                            self.threads, self.env)
        return submitit.helpers.DelayedSubmission(again)


def executor_parameters(plan: Any, site: Any, run_id: str, time_min: int | None, gpus: bool) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` for one run's plan: tasks per GPU, its time limit, the site's queue."""
    layout = plan.layout
    extra: dict[str, Any] = {"mem": f"{site.mem_mb_per_gpu * layout.gpus_per_node}M"}
    if site.account:
        extra["account"] = site.account
    params: dict[str, Any] = {
        "job_name": f"densessl-{run_id.replace('/', '-')}", "nodes": layout.nodes,
        "ntasks_per_node": layout.gpus_per_node, "cpus_per_task": site.cpus_per_gpu,
        "time": time_min or plan.time.runtime or site.max_time or 4320,
        "signal_delay_s": site.signal_seconds, "additional_parameters": extra,
        "setup": [f"export {PREEMPT_SIGNAL_ENV}={PREEMPT_SIGNAL}"],
    }
    if gpus:
        params["gpus_per_node"] = layout.gpus_per_node
    if site.partition:
        params["partition"] = site.partition
    if site.qos:
        params["qos"] = site.qos
    return params


def submit(job: PretrainJob, folder: Path, params: dict[str, Any], max_timeouts: int, wait: bool) -> int:
    submitit = _submitit()
    executor = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=max_timeouts)
    executor.update_parameters(**params)
    handle = executor.submit(job)
    print(f"submitted SLURM job {handle.job_id}: logs in {folder / str(handle.job_id)}", flush=True)
    if not wait:
        return 0
    while not handle.done():
        time.sleep(5)
    try:
        outcomes = handle.results()
    except Exception as exc:  # submitit's FailedJobError etc.: the job's own traceback is in its log
        print(f"SLURM job {handle.job_id} failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"SLURM job {handle.job_id} finished: {outcomes[0]}", flush=True)
    return 0


def launch_command(args: Any) -> int:
    """The ``launch`` subcommand."""
    import dataclasses

    from densessl.config import find_project_root, load_config
    from densessl.launch.resources import FAILURE_RETRIES, compute_plan, describe, site_of

    config_files = [str(Path(f).resolve()) for f in (args.config or ["config.yaml"])]
    cfg = load_config(config_files, preset=args.preset, check_settings=False)
    run = cfg.run(args.run)
    if run.released or run.is_random_init:
        raise ConfigError(f"{run.id}: launch trains pretraining runs; this one has no pretraining")
    site = site_of(cfg)
    changes = {k: v for k, v in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                                 ("cpus_per_gpu", args.cpus_per_gpu), ("mem_mb_per_gpu", args.mem_mb_per_gpu))
               if v is not None}
    site = dataclasses.replace(site, **changes)
    plan = compute_plan(cfg, run, args.nodes, args.gpus_per_node)  # refuses counts that cannot keep the recipe
    params = executor_parameters(plan, site, run.id, args.time, plan.layout.gpus)
    print(describe(plan))
    if args.dry_run:
        print("sbatch parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        return 0
    folder = cfg.pretrain_dir(run).resolve() / "submitit"
    job = PretrainJob(config_files, cfg.preset, run.id, str(Path.cwd()), str(find_project_root()),
                      resume=args.resume or os.environ.get("DENSESSL_RESUME") or "auto", threads=args.threads)
    return submit(job, folder, params, plan.time.segments + FAILURE_RETRIES, args.wait)
