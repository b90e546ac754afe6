"""A run on several GPUs inside a SLURM allocation: one ``srun`` task per GPU over every node of the job.

Why srun and not torchrun here: the allocation already says where every process goes (nodes, tasks per node),
SLURM delivers the time-limit and preemption signals to every task itself (so each rank checkpoints on
SIGTERM exactly as a single process does), and srun's exit code is the highest of the tasks' — a preempted run
exits 3 without a marker file. Single-node runs outside SLURM keep torchrun (``densessl.train.launch``).

Launcher side (``launch_tasks``, in the job's batch script, e.g. under Snakemake with the ``mpi`` resource so the
plugin starts no step of its own): reads the allocation from ``scontrol show job`` (the Snakemake job step
strips SLURM's variables except the job id), picks a free port on this host (the first node, where SLURM's
block distribution puts rank 0) and starts::

    srun --nodes=M --ntasks=W --ntasks-per-node=N --cpus-per-task=C --distribution=block --wait=120 \
         [--gpus-per-node=N] python -m densessl <the same arguments>

Task side (``adopt_task_env``): maps ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``/the step's tasks per node
onto ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``, and ``MASTER_ADDR`` to the first host of the
step's node list, so the trainer's ``init_process_group`` (env://) joins the group: NCCL on GPUs, gloo on CPUs.

``--wait=120``: once a task has ended the others get 120 s before srun ends them, so a crashed rank does not
leave the rest blocked in a collective; every rank waits for rank 0's final files first (a barrier in
``stages/pretrain.py``), so a finished or preempted run ends well inside it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from densessl.errors import ConfigError

LAUNCHER_ENV = "DENSESSL_LAUNCHER"       # "srun" in the tasks that launch_tasks starts
MASTER_PORT_ENV = "DENSESSL_MASTER_PORT"
SRUN_WAIT_S = 120


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login5") → ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            names = [n + literal for n in names]
            if ranges:
                expanded = []
                for part in ranges.split(","):
                    low, _, high = part.partition("-")
                    if high:
                        expanded += [f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1)]
                    else:
                        expanded.append(part)
                names = [n + e for n in names for e in expanded]
        hosts += [n for n in names if n]
    return hosts


def expand_counts(counts: str) -> list[int]:
    """SLURM's per-node counts ("4(x2),3") → [4, 4, 3]."""
    out: list[int] = []
    for part in counts.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"unreadable SLURM per-node count {counts!r}")
        out += [int(match.group(1))] * int(match.group(2) or 1)
    return out


def adopt_task_env(env: MutableMapping[str, str] | None = None) -> bool:
    """In a task started by ``launch_tasks``: set torch.distributed's variables from SLURM's; True if done."""
    env = os.environ if env is None else env
    if env.get(LAUNCHER_ENV) != "srun" or "SLURM_PROCID" not in env:
        return False
    node = int(env.get("SLURM_NODEID", "0"))
    per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    hosts = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost")
    env.update({
        "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1",
        "LOCAL_WORLD_SIZE": str(per_node[min(node, len(per_node) - 1)]), "GROUP_RANK": str(node),
        "MASTER_ADDR": hosts[0], "MASTER_PORT": env[MASTER_PORT_ENV],
    })
    return True


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: int
    tasks: int
    cpus_per_task: int

    @property
    def tasks_per_node(self) -> int:
        return self.tasks // self.nodes


def in_allocation(env: Mapping[str, str] | None = None) -> bool:
    """Inside a SLURM job but not inside one of its steps (a batch script, or a Snakemake job with ``mpi``)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID")) and not env.get("SLURM_STEP_ID") and env.get(LAUNCHER_ENV) != "srun"


def parse_scontrol(text: str, job_id: str) -> Allocation:
    """The allocation from ``scontrol show job -o <id>``."""
    fields = dict(re.findall(r"(\S+?)=(\S*)", text))
    try:
        return Allocation(job_id, int(fields["NumNodes"].split("-")[0]), int(fields["NumTasks"]),
                          int(fields.get("CPUs/Task", "1") or 1))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"scontrol show job {job_id}: cannot read NumNodes/NumTasks ({exc})") from None


def read_allocation(job_id: str, env: Mapping[str, str] | None = None) -> Allocation:
    """From SLURM's variables in a batch script; from ``scontrol show job`` where they were removed (a Snakemake
    job step keeps only the job id)."""
    env_map = os.environ if env is None else env
    if all(env_map.get(k) for k in ("SLURM_JOB_NUM_NODES", "SLURM_NTASKS")):
        return Allocation(job_id, int(env_map["SLURM_JOB_NUM_NODES"]), int(env_map["SLURM_NTASKS"]),
                          int(env_map.get("SLURM_CPUS_PER_TASK") or 1))
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env=None if env is None else dict(env))
    if out.returncode != 0:
        raise ConfigError(f"scontrol show job {job_id}: {out.stderr.strip() or out.returncode}")
    return parse_scontrol(out.stdout, job_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def srun_command(alloc: Allocation, argv: Sequence[str], gpus: bool, module: str = "densessl",
                 python: str | None = None) -> list[str]:
    command = ["srun", f"--nodes={alloc.nodes}", f"--ntasks={alloc.tasks}",
               f"--ntasks-per-node={alloc.tasks_per_node}", f"--cpus-per-task={alloc.cpus_per_task}",
               "--distribution=block", f"--wait={SRUN_WAIT_S}", "--kill-on-bad-exit=0"]
    if gpus:
        command.append(f"--gpus-per-node={alloc.tasks_per_node}")
    return [*command, python or sys.executable, "-m", module, *argv]


def launch_tasks(argv: Sequence[str], world: int, gpus: bool, module: str = "densessl",
                 env: Mapping[str, str] | None = None) -> int:
    """Start the run's tasks over the allocation with srun and wait; returns srun's exit code (3: preempted)."""
    env_map = dict(os.environ if env is None else env)
    if shutil.which("srun", path=env_map.get("PATH")) is None:
        raise ConfigError("inside a SLURM job but srun is not on PATH; add SLURM's bin folder to PATH")
    alloc = read_allocation(env_map["SLURM_JOB_ID"], env_map)
    if alloc.tasks != world or alloc.tasks % alloc.nodes:
        raise ConfigError(f"SLURM job {alloc.job_id} has {alloc.tasks} task(s) on {alloc.nodes} node(s), but the run "
                          f"is planned on {world} process(es); submit it with --ntasks={world} and the same "
                          f"--ntasks-per-node on every node (the pretrain rule and `densessl launch` do)")
    env_map.update({LAUNCHER_ENV: "srun", MASTER_PORT_ENV: str(free_port())})
    command = srun_command(alloc, argv, gpus, module)
    print(f"densessl launch: {' '.join(command)}", file=sys.stderr, flush=True)
    from densessl.train.launch import wait_forwarding_signals

    # srun and its tasks receive SLURM's signals themselves
    code = wait_forwarding_signals(subprocess.Popen(command, env=env_map))
    return code if code >= 0 else 128 - code
