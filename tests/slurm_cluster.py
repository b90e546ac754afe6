"""A one-node SLURM cluster on loopback, with accounting and fake GPUs, for the opt-in SLURM tests.

Everything lives in one temporary folder: its own munge key and socket, a MariaDB server bound to 127.0.0.1
(its own data folder, socket and port) holding slurmdbd's accounting database, `slurm.conf`,
`slurmdbd.conf`, `gres.conf`, state and spool folders, free loopback ports. Nothing is written outside it.

* Accounting: slurmdbd stores every job in MariaDB, so `sacct` answers (states, exit codes, the REQUEUED
  records of a requeued job with `sacct -D`) and snakemake-executor-plugin-slurm polls it, as on a site
  cluster. The cluster is registered with `sacctmgr` before slurmctld starts.
* Fake GPUs: the node declares `Gres=gpu:<n>`; `gres.conf` (AutoDetect=off) names one device file per GPU,
  symbolic links to /dev/null (SLURM only stats them, and `TaskPlugin=task/none` never fences them). A job
  asking `--gpus=1` is scheduled on one of them and sees `CUDA_VISIBLE_DEVICES` and `SLURM_JOB_GPUS`; a job
  asking more than the node has is refused at submission.
* The snakemake executor strips every `SLURM_*` variable (`SLURM_CONF` included) from the environment of its
  inner `srun`, which on a real cluster then reads /etc/slurm/slurm.conf; a two-line `srun` on PATH that sets
  `SLURM_CONF` stands in for that file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CLUSTER_NAME = "densessl-test"
FAKE_GPUS = 2
# seconds a requeued job waits before it may start again (SLURM's default 120; the credential of its previous run
# must have expired); short here so that the tests' requeues cost seconds
CRED_EXPIRE_S = 10
TOOLS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "sbatch",
         "squeue", "scancel", "srun", "sinfo", "scontrol", "sacct", "sacctmgr")


def sbin(name: str) -> str:
    """Debian installs the daemons in /usr/sbin, which a non-login root shell may not have on PATH."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _ok(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def _start_mariadb(root: Path) -> tuple[int, str, subprocess.Popen[bytes]]:
    """MariaDB on 127.0.0.1:<port> with a `slurm` user allowed on slurmdbd's database: (port, password, process)."""
    data, run = root / "mysql", root / "mysql-run"
    run.mkdir()
    subprocess.run([sbin("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                    "--skip-test-db", "--auth-root-authentication-method=socket"],
                   check=True, capture_output=True)
    port, sock = free_port(), run / "mysqld.sock"
    server = subprocess.Popen(
        [sbin("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
         "--bind-address=127.0.0.1", "--skip-name-resolve", "--user=root", f"--pid-file={run}/mysqld.pid",
         f"--log-error={run}/error.log", "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M",
         "--skip-log-bin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = [sbin("mariadb"), "--no-defaults", f"--socket={sock}", "-u", "root"]
    wait_for(lambda: server.poll() is not None or _ok([*client, "-e", "SELECT 1"]), 60, "MariaDB to accept connections")
    if server.poll() is not None:
        raise RuntimeError(f"mariadbd exited: {(run / 'error.log').read_text()[-2000:]}")
    password = secrets.token_hex(12)
    subprocess.run([*client, "-e", f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                                   f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"], check=True)
    return port, password, server


def _write_configs(root: Path, sock: Path, db_port: int, db_password: str) -> Path:
    ctld_port, slurmd_port, dbd_port = free_port(), free_port(), free_port()
    dbd = root / "slurmdbd.conf"
    dbd.write_text(f"""AuthType=auth/munge
AuthInfo=socket={sock}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass={db_password}
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds the database password)
    (root / "dev").mkdir()
    for i in range(FAKE_GPUS):
        (root / "dev" / f"gpu{i}").symlink_to("/dev/null")
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName=localhost Name=gpu File={root}/dev/gpu[0-{FAKE_GPUS - 1}]\n")
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire={CRED_EXPIRE_S}
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
AccountingStoragePass={sock}
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MinJobAge=3600
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} RealMemory=8000 Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _kill_pidfile(path: Path) -> None:
    if path.exists():
        subprocess.run(["kill", path.read_text().strip()], capture_output=True)


def start_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Start munge, MariaDB, slurmdbd, slurmctld and slurmd under ``root``; yield the environment in which
    the SLURM commands talk to this cluster; stop everything afterwards."""
    for d in ("state", "spool", "munge", "bin"):
        (root / d).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.sock"
    subprocess.run([sbin("munged"), f"--key-file={key}", f"--socket={sock}", f"--pid-file={root}/munge/pid",
                    f"--log-file={root}/munge/log", f"--seed-file={root}/munge/seed", "--force"], check=True)
    mariadb: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = {}
    try:
        db_port, db_password, mariadb = _start_mariadb(root)
        conf = _write_configs(root, sock, db_port, db_password)
        shim = root / "bin" / "srun"
        shim.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
        shim.chmod(0o755)
        env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run([sbin("slurmdbd")], env=env, check=True)
        # the first sacctmgr call also waits for slurmdbd to create its tables
        wait_for(lambda: _ok(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env), 60, "slurmdbd to register the cluster")
        subprocess.run([sbin("slurmctld"), "-i"], env=env, check=True)
        subprocess.run([sbin("slurmd"), "-N", "localhost"], env=env, check=True)
        wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                                  text=True).stdout, 30, "the node to come up idle")
        yield env
    finally:
        if env:
            subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        for daemon in ("slurmd", "slurmctld", "slurmdbd"):  # what `scontrol shutdown` could not reach
            _kill_pidfile(root / f"{daemon}.pid")
        if mariadb is not None:
            mariadb.terminate()
            try:
                mariadb.wait(timeout=30)
            except subprocess.TimeoutExpired:
                mariadb.kill()
        _kill_pidfile(root / "munge" / "pid")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a running loopback cluster (``SLURM_CONF``, ``PATH`` with the `srun` shim)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM not installed (missing {missing}); `make test-slurm` installs it")
    if os.geteuid() != 0:
        pytest.skip("slurmd needs root to start job steps")
    yield from start_cluster(tmp_path_factory.mktemp("slurm"))


def jobs(env: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(job id, state, exit code, stdout path) of every job the controller remembers (MinJobAge 1 h)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-O", "JobID:12,State:14,exit_code:8,STDOUT:400"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return [tuple(line.split(None, 3)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def sacct(env: dict[str, str], *job_ids: str, duplicates: bool = False) -> list[dict[str, str]]:
    """The accounting records of the given jobs (all when none): JobIDRaw, JobName, State, ExitCode, Submit.
    ``duplicates``: also the earlier records of a requeued job (``sacct -D``), oldest first."""
    fields = ("JobIDRaw", "JobName", "State", "ExitCode", "Submit")
    cmd = ["sacct", "-X", "-n", "--parsable2", f"--format={','.join(fields)}", "--starttime", "now-1days"]
    cmd += ["-D"] if duplicates else []
    cmd += ["-j", ",".join(job_ids)] if job_ids else ["-a"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    records = [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]
    for record in records:
        record["State"] = record["State"].split()[0]  # "CANCELLED by 0" → "CANCELLED"
    return records
