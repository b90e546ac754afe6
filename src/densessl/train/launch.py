"""Run a stage on N processes (one per GPU) of one node.

``launch(argv, nproc, run_in_process)`` is what the pretrain stage and the mmdet evaluations call. With ``nproc > 1`` and not already
inside a torchrun worker, it re-executes the same command line under torchrun::

    DENSESSL_WORKER_ARGV='{"module": "densessl", "argv": [<argv>]}' \
    python -m torch.distributed.run --standalone --nproc_per_node N \
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 120 -m densessl.train.torchrun_worker

(the stage's words travel in the environment because torchrun's argparse would take ``--run`` for its own
``--run-path``: ``torchrun_worker.py``) and waits for it; each worker then takes the in-process path, where the
stage reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from torchrun's environment and joins the process group. With ``nproc == 1`` (every CPU run,
smoke scale) or inside a worker, ``run_in_process()`` runs here.

Exit codes. The trainer turns SIGTERM/SIGINT/SIGUSR1, sent to it alone or to its whole process group, into
"finish the step, checkpoint, exit ``REQUEUE_EXIT_CODE``" (trainer.py; DataLoader workers ignore these
signals, signals.py). torchrun does not pass a worker's exit code through: any failed worker makes it exit 1
(measured with torch 2.14). So the launcher sets ``DENSESSL_REQUEUE_MARKER`` to a file in a private temporary
folder; rank 0 of a preempted run writes it when the stage raises ``Preempted`` (after its checkpoint: the
trainer's, or an mmengine protocol's); when torchrun ends and the file exists the launcher exits
``REQUEUE_EXIT_CODE``, otherwise with torchrun's own code.

Signals. ``--signals-to-handle`` adds SIGUSR1 to what torchrun traps, so a SIGUSR1 does not kill torchrun
(the default action) but is forwarded to the workers, which then have ``--shutdown-timeout`` seconds to
finish their step and write the checkpoint before torchrun SIGKILLs them (the default 30 s is tight for a
ViT-L checkpoint on a network file system). SLURM, a terminal's Ctrl-C and process-group kills all signal
every process, torchrun and workers included. torchrun gives up its orderly shutdown when a second
terminating signal arrives, so the launcher does not forward a first signal; it only records it. A second
signal to the launcher is forwarded to torchrun as SIGTERM and a third kills it (SIGKILL), which covers a
launcher that was signalled on its own.

SLURM (workflow/profiles/slurm, snakemake-executor-plugin-slurm): a run on one GPU is the plugin's own
``srun -n1 --gpus=1`` step and runs here in-process; a run on several GPUs, on one node or many, is started as
one srun task per GPU over the allocation by ``densessl.launch.srun`` (the pretrain stage chooses), with the
resources of its compute plan (``densessl.launch.resources``). Two ways a run is interrupted:

* Time limit: every job asks for ``--signal=TERM@180``, so each process of the job step receives SIGTERM 180 s
  before the limit. TERM, not USR1: the plugin runs a nested Snakemake inside the step, which finishes its
  running job on SIGTERM (``JobScheduler.exit_gracefully``) but has no SIGUSR1 handler, so USR1 would kill it
  and with it the step. The run checkpoints, requeues its own job (``densessl.train.requeue``: same job id, no
  Snakemake retry spent; in an srun job the launcher process requeues, not the tasks) and exits 3; the
  requeued job resumes from ``checkpoint.pt`` (same seed-determined data order, so the same run continues).
* Preemption: with ``PreemptMode=REQUEUE`` SLURM sends SIGTERM (GraceTime) and requeues the job itself under
  the same job id; the plugin sees PREEMPTED and leaves the job to SLURM (it does not count a retry). With
  ``PreemptMode=CANCEL`` the job ends CANCELLED and Snakemake's retry resubmits it.

Only an interruption that ends as a failure (a TIMEOUT without warning, a refused requeue, a crash) uses one
of Snakemake's ``retries``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

REQUEUE_EXIT_CODE = 3  # a preempted run exits with this code after its checkpoint (trainer.Preempted)
REQUEUE_MARKER_ENV = "DENSESSL_REQUEUE_MARKER"  # file rank 0 writes when it stops for a signal
SHUTDOWN_TIMEOUT_S = 120  # torchrun --shutdown-timeout: seconds workers get to checkpoint after a signal
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _config_error(message: str) -> Exception:
    from densessl.errors import ConfigError

    return ConfigError(message)


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a worker started by torchrun (or any launcher that sets the torch.distributed variables)."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def _count_from_slurm(value: str) -> int | None:
    """'8', 'a100:4', 'gpu:a100:2' or '4(x2)' → the per-node count; None when unreadable."""
    match = re.match(r"^(?:[A-Za-z0-9_\-]+:)*(\d+)(?:\(x\d+\))?$", value.strip())
    return int(match.group(1)) if match else None


def resolve_nproc(requested: int | None = None, env: Mapping[str, str] | None = None,
                  cuda_devices: int | None = None) -> int:
    """Processes to start on this node.

    ``requested`` (``train.nproc_per_node``) wins. Otherwise one process per GPU of this job: SLURM's
    ``SLURM_GPUS_ON_NODE`` (set by ``--gpus``/``--gres``), then ``SLURM_GPUS_PER_NODE``, then the
    ``CUDA_VISIBLE_DEVICES`` list, then ``torch.cuda.device_count()``; 1 when there is no GPU (CPU runs
    train in one process: gloo on 2 shared cores is slower than one process with both threads).
    """
    env = os.environ if env is None else env
    if requested is not None:
        if not isinstance(requested, int) or requested < 1:
            raise _config_error(f"train.nproc_per_node={requested!r}: must be an integer ≥ 1, or null for "
                                f"one process per GPU of the job")
        return requested
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            count = _count_from_slurm(env[key])
            if count is not None and count > 0:
                return count
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(1, cuda_devices)


def torchrun_command(nproc: int, python: str | None = None) -> list[str]:
    """The command that starts ``nproc`` torchrun workers on this node, each running what
    ``DENSESSL_WORKER_ARGV`` names (:func:`worker_env`; not on torchrun's command line, ``torchrun_worker.py``)."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "--signals-to-handle", TORCHRUN_SIGNALS,
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "-m", "densessl.train.torchrun_worker"]


def worker_env(argv: Sequence[str], module: str = "densessl") -> dict[str, str]:
    """The variable that makes each worker of :func:`torchrun_command` run ``python -m <module> <argv>``."""
    from densessl.train.torchrun_worker import WORKER_ARGV_ENV, worker_spec

    return {WORKER_ARGV_ENV: worker_spec(module, list(argv))}


def write_requeue_marker(message: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Called by rank 0 of a preempted run: tells the launcher to exit with ``REQUEUE_EXIT_CODE``."""
    env = os.environ if env is None else env
    target = env.get(REQUEUE_MARKER_ENV)
    if not target:
        return None
    path = Path(target)
    path.write_text(message + "\n", encoding="utf-8")
    return path


class _SignalPolicy:
    """Record the first terminating signal, forward the second as SIGTERM, SIGKILL on the third."""

    def __init__(self, child: subprocess.Popen[Any]):
        self.child = child
        self.received: list[int] = []

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.child.poll() is not None:
            return
        if len(self.received) == 2:
            self.child.send_signal(signal.SIGTERM)
        elif len(self.received) >= 3:
            self.child.kill()


def wait_forwarding_signals(child: subprocess.Popen) -> int:
    """Wait for a launched child with the launcher's signal policy installed, restoring the handlers after."""
    policy = _SignalPolicy(child)
    previous = {s: signal.signal(s, policy) for s in FORWARDED_SIGNALS}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_torchrun(nproc: int, argv: Sequence[str], module: str = "densessl",
                 env: Mapping[str, str] | None = None) -> int:
    """Start torchrun, wait for it, and map a preempted run to ``REQUEUE_EXIT_CODE``."""
    child_env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="densessl-launch-") as folder:
        marker = Path(folder) / "requeue"
        child_env[REQUEUE_MARKER_ENV] = str(marker)
        child_env.update(worker_env(argv, module))
        code = wait_forwarding_signals(subprocess.Popen(torchrun_command(nproc), env=child_env))
        if marker.exists():
            print(f"densessl launch: {marker.read_text(encoding='utf-8').strip()}; exiting with "
                  f"{REQUEUE_EXIT_CODE} (requeue)", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        return code if code >= 0 else 128 - code  # killed by signal N → 128 + N, as a shell reports it


def launch(argv: Sequence[str], nproc: int, run_in_process: Callable[[], object], module: str = "densessl",
           env: Mapping[str, str] | None = None) -> int:
    """Run one stage on ``nproc`` processes; returns the process exit code.

    ``argv`` is the stage's command line after ``python -m densessl`` (e.g. ``["pretrain", "--run", ...]``);
    ``run_in_process`` does the work in this process (a worker of the torchrun group, or the only process).
    """
    env_map = os.environ if env is None else env
    if nproc < 1:
        raise _config_error(f"nproc_per_node={nproc}: must be ≥ 1")
    if nproc > 1 and not under_torchrun(env_map):
        return run_torchrun(nproc, argv, module, env_map)
    from densessl.train.trainer import Preempted

    try:
        run_in_process()
    except Preempted as exc:
        if env_map.get("RANK", "0") == "0":
            write_requeue_marker(str(exc), env_map)  # torchrun exits 1 for any failed worker: the marker says why
        print(f"densessl: {exc}; exiting with {REQUEUE_EXIT_CODE} (requeue)", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0
