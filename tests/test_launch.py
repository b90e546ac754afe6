"""densessl.train.launch: process count, torchrun command, exit-code mapping, signal policy."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from densessl.errors import ConfigError
from densessl.train import launch as launch_module
from densessl.train.launch import (
    REQUEUE_EXIT_CODE,
    REQUEUE_MARKER_ENV,
    launch,
    resolve_nproc,
    torchrun_command,
    under_torchrun,
    worker_env,
    write_requeue_marker,
)
from densessl.train.trainer import Preempted


def test_resolve_nproc_precedence():
    assert resolve_nproc(3, env={"SLURM_GPUS_ON_NODE": "8"}) == 3                 # the config wins
    assert resolve_nproc(None, env={"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0"}) == 8
    assert resolve_nproc(None, env={"SLURM_GPUS_PER_NODE": "a100:4"}) == 4
    assert resolve_nproc(None, env={"SLURM_GPUS_PER_NODE": "gpu:a100:2(x3)"}) == 2
    assert resolve_nproc(None, env={"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert resolve_nproc(None, env={"CUDA_VISIBLE_DEVICES": ""}) == 1             # GPUs hidden: one CPU process
    assert resolve_nproc(None, env={}, cuda_devices=0) == 1
    assert resolve_nproc(None, env={}, cuda_devices=4) == 4
    with pytest.raises(ConfigError, match="train.nproc_per_node=0"):
        resolve_nproc(0, env={})


def test_torchrun_command_and_detection():
    cmd = torchrun_command(4, python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                   "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "120",
                   "-m", "densessl.train.torchrun_worker"]
    assert json.loads(worker_env(["pretrain", "--run", "dino/vit-s16-imagenet"])["DENSESSL_WORKER_ARGV"]) == {
        "module": "densessl", "argv": ["pretrain", "--run", "dino/vit-s16-imagenet"]}
    assert under_torchrun({"TORCHELASTIC_RUN_ID": "x"})
    assert under_torchrun({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not under_torchrun({"SLURM_PROCID": "0"})


def test_in_process_paths_and_requeue_code():
    calls = []
    assert launch(["pretrain"], 1, lambda: calls.append("ran"), env={}) == 0
    # a torchrun worker runs in process even though nproc > 1
    assert launch(["pretrain"], 2, lambda: calls.append("worker"), env={"TORCHELASTIC_RUN_ID": "x"}) == 0
    assert calls == ["ran", "worker"]

    def preempted() -> None:
        raise Preempted("signal 15 at step 7; checkpoint saved")

    assert launch(["pretrain"], 1, preempted, env={}) == REQUEUE_EXIT_CODE


def test_requeue_marker(tmp_path):
    assert write_requeue_marker("x", env={}) is None
    marker = tmp_path / "requeue"
    assert write_requeue_marker("signal 10 at step 3", env={REQUEUE_MARKER_ENV: str(marker)}) == marker
    assert marker.read_text() == "signal 10 at step 3\n"


@pytest.mark.parametrize("script, expected", [
    ("import sys; sys.exit(5)", 5),                                     # an ordinary failure passes through
    ("import sys; sys.exit(0)", 0),
    # torchrun exits 1 when a worker exits 3; the marker written by rank 0 turns it into the requeue code
    ("import os, sys; open(os.environ['DENSESSL_REQUEUE_MARKER'], 'w').write('pre'); sys.exit(1)", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9),
])
def test_run_torchrun_maps_exit_codes(monkeypatch, script, expected):
    monkeypatch.setattr(launch_module, "torchrun_command", lambda *a, **k: [sys.executable, "-c", script])
    assert launch_module.run_torchrun(2, ["pretrain"]) == expected


def test_signal_policy_records_first_forwards_second_kills_third():
    class FakeChild:
        def __init__(self):
            self.sent: list[object] = []

        def poll(self):
            return None

        def send_signal(self, sig):
            self.sent.append(sig)

        def kill(self):
            self.sent.append("KILL")

    child = FakeChild()
    policy = launch_module._SignalPolicy(child)  # type: ignore[arg-type]
    policy(signal.SIGUSR1, None)
    assert child.sent == []                    # torchrun got it from SLURM/the terminal too
    policy(signal.SIGTERM, None)
    assert child.sent == [signal.SIGTERM]
    policy(signal.SIGTERM, None)
    assert child.sent == [signal.SIGTERM, "KILL"]


def test_workers_get_the_stage_words_torchrun_would_misparse(tmp_path):
    """``--run`` is ambiguous to torchrun's argparse (its ``--run-path``) and ``--ro`` a prefix of its ``--role``:
    both reach the workers as written, on a real 2-process torchrun."""
    (tmp_path / "argv_echo.py").write_text(
        "import json, os, sys\n"
        "open(os.path.join(sys.argv[-1], 'rank%s.json' % os.environ['RANK']), 'w').write(json.dumps(sys.argv[1:]))\n")
    argv = ["evaluate", "--run", "clove/resnet-tiny-imagenet", "--ro", "x", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    assert launch(argv, 2, lambda: None, module="argv_echo", env=env) == 0
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == argv


def test_rank_0_leaves_the_marker_when_preempted(tmp_path):
    def preempted():
        raise Preempted("signal 15 at iteration 4")

    marker = tmp_path / "requeue"
    worker = {REQUEUE_MARKER_ENV: str(marker), "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"}
    assert launch(["evaluate"], 2, preempted, env={**worker, "RANK": "1"}) == REQUEUE_EXIT_CODE
    assert not marker.exists()
    assert launch(["evaluate"], 2, preempted, env={**worker, "RANK": "0"}) == REQUEUE_EXIT_CODE
    assert marker.read_text() == "signal 15 at iteration 4\n"
