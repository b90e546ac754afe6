"""srun tasks inside a SLURM allocation (densessl.launch.srun): host lists, the task environment that
torch.distributed reads, the allocation from scontrol and the srun command line."""

from __future__ import annotations

import pytest

from densessl.errors import ConfigError
from densessl.launch.srun import (
    LAUNCHER_ENV,
    MASTER_PORT_ENV,
    Allocation,
    adopt_task_env,
    expand_counts,
    expand_hostlist,
    in_allocation,
    parse_scontrol,
    srun_command,
)


@pytest.mark.parametrize(("text", "hosts"), [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-10],login5", ["gpu8", "gpu9", "gpu10", "login5"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
])
def test_hostlists(text, hosts):
    assert expand_hostlist(text) == hosts


def test_per_node_counts():
    assert expand_counts("4(x2),3") == [4, 4, 3]
    with pytest.raises(ValueError):
        expand_counts("four")


def test_task_environment_from_slurm():
    env = {LAUNCHER_ENV: "srun", MASTER_PORT_ENV: "29511", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
           "SLURM_STEP_NODELIST": "gpu[03-04]"}
    assert adopt_task_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} \
        == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu03",
            "MASTER_PORT": "29511"}
    plain = {"SLURM_PROCID": "0"}  # a task someone else started: left alone
    assert not adopt_task_env(plain) and "RANK" not in plain


def test_where_the_launcher_starts_tasks():
    assert in_allocation({"SLURM_JOB_ID": "7"})                        # batch script / Snakemake mpi job
    assert not in_allocation({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"})  # inside a step already
    assert not in_allocation({"SLURM_JOB_ID": "7", LAUNCHER_ENV: "srun"})
    assert not in_allocation({})


def test_allocation_and_command():
    text = ("JobId=42 JobName=x UserId=root(0) JobState=RUNNING NumNodes=2 NumCPUs=160 NumTasks=16 "
            "CPUs/Task=10 ReqB:S:C:T=0:0:*:* NodeList=gpu[03-04]")
    alloc = parse_scontrol(text, "42")
    assert alloc == Allocation("42", 2, 16, 10) and alloc.tasks_per_node == 8
    command = srun_command(alloc, ["pretrain", "--run", "dino/vit-s16-imagenet"], gpus=True, python="py")
    assert command == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--cpus-per-task=10",
                       "--distribution=block", "--wait=120", "--kill-on-bad-exit=0", "--gpus-per-node=8",
                       "py", "-m", "densessl", "pretrain", "--run", "dino/vit-s16-imagenet"]
    with pytest.raises(ConfigError, match="NumNodes"):
        parse_scontrol("JobId=42", "42")
