"""Faults a user can cause, each reproduced through the CLI as on a cluster: a changed setting, a forced rerun,
a corrupt checkpoint, a torn metrics line, a diverged run, a read-only folder, a full disk, a second process
on the same run, an empty dataset. Each asserts the one-line message, the exit code and what survived.
docs/faults.md lists them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from faults_project import REPO, RUN, cli, run_dir, write_config

from densessl.train import checkpointing


def _attempts(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(folder) / "attempts.jsonl").read_text().splitlines()]


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir(folder) / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    # the CPU line of an earlier, successful stage call in the same test is not part of the error
    lines = [line for line in err.splitlines() if line.startswith("densessl ") and not line.startswith("densessl cpu:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def test_changed_setting_is_refused_naming_it_then_restart_or_anyway(project: Path, capsys) -> None:
    config = project / "config.yaml"
    assert cli(config, "pretrain", "--run", RUN) == 0
    first = _losses(project)
    (run_dir(project) / "final.pt").unlink()  # as Snakemake does before re-running the job
    (run_dir(project) / "attempts.jsonl").unlink()  # not finished: an interrupted run with old settings
    write_config(project, {"lr": 2.0e-3})
    assert cli(config, "pretrain", "--run", RUN) == 2
    line = _one_line_error(capsys)
    assert "checkpoint.pt: checkpoint of other settings (train.lr: 0.001 -> 0.002)" in line, line
    assert "--resume-anyway" in line and "--restart" in line
    assert not (run_dir(project) / "final.pt").exists()
    assert cli(config, "pretrain", "--run", RUN, "--restart") == 0
    assert _attempts(project)[0] == {**_attempts(project)[0], "event": "start", "step": 0, "resumed": False}
    assert len(_losses(project)) == 8 and _losses(project) != first  # retrained with the new lr
    write_config(project, {"lr": 1.0e-3, "epochs": 3})  # one more epoch, continuing the finished run
    assert cli(config, "pretrain", "--run", RUN, "--resume-anyway") == 0
    assert _attempts(project)[-2]["step"] == 8 and _attempts(project)[-2]["resumed"]


def test_forcerun_of_a_finished_run_starts_over(project: Path, capsys) -> None:
    """`snakemake --forcerun pretrain` deletes final.pt and runs the job again: it must not just relabel it."""
    config = project / "config.yaml"
    assert cli(config, "pretrain", "--run", RUN) == 0
    (run_dir(project) / "final.pt").unlink()
    assert cli(config, "pretrain", "--run", RUN) == 0
    assert "training again from the start" in capsys.readouterr().err
    starts = [r for r in _attempts(project) if r["event"] == "start"]
    assert [(r["step"], r["resumed"], r["restart"]) for r in starts] == [(0, False, False), (0, False, True)]
    assert (run_dir(project) / "final.pt").is_file()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(project: Path, capsys, caplog) -> None:
    config = project / "config.yaml"
    assert cli(config, "pretrain", "--run", RUN) == 0
    full = _losses(project)
    folder = run_dir(project)
    # an attempt that stopped at step 6: newest checkpoint at 6 (torn below), previous at 4
    assert cli(config, "pretrain", "--run", RUN, "--restart") == 0
    state = checkpointing.read_verified(folder / "checkpoint.pt")
    state["epoch"], state["batch_in_epoch"] = 1, 0
    torch.save(state, folder / "checkpoint.previous.pt")  # the epoch-end checkpoint (step 4) of that run
    (folder / "final.pt").unlink()
    (folder / "attempts.jsonl").unlink()
    data = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # torn: the node died while writing
    assert cli(config, "pretrain", "--run", RUN) == 0
    assert "checkpoint.pt: unreadable checkpoint" in caplog.text and "Traceback" not in capsys.readouterr().err
    assert _attempts(project)[0]["step"] == 4 and _attempts(project)[0]["resumed"]
    assert len(_losses(project)) == 8
    # both unusable: one line saying how to start over
    (folder / "final.pt").unlink()
    (folder / "attempts.jsonl").unlink()
    for name in ("checkpoint.pt", "checkpoint.previous.pt"):
        (folder / name).write_bytes(b"")
    assert cli(config, "pretrain", "--run", RUN) == 2
    line = _one_line_error(capsys)
    assert "no usable checkpoint is left" in line and "--restart" in line
    assert full  # the finished losses of the first run were written


def test_torn_last_metrics_line_is_dropped_on_resume(project: Path, capsys) -> None:
    config = project / "config.yaml"
    write_config(project, {"epochs": 1})
    assert cli(config, "pretrain", "--run", RUN) == 0
    folder = run_dir(project)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # killed mid-write
    (folder / "final.pt").unlink()
    (folder / "attempts.jsonl").unlink()
    write_config(project, {"epochs": 2})
    assert cli(config, "pretrain", "--run", RUN, "--resume-anyway") == 0
    assert "Traceback" not in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


def test_non_finite_loss_keeps_the_last_finite_checkpoint_apart(project: Path, capsys, monkeypatch) -> None:
    """After a NaN stop, lowering the lr must continue from finite weights, not from the diverged state."""
    from densessl.methods.dino import DINO

    config = project / "config.yaml"
    real, calls = DINO.loss, {"n": 0}

    def nan_at_step_five(self, batch, epoch):
        loss, logs = real(self, batch, epoch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 6 else loss), logs

    with monkeypatch.context() as m:
        m.setattr(DINO, "loss", nan_at_step_five)
        assert cli(config, "pretrain", "--run", RUN) == 2
    line = _one_line_error(capsys)
    assert "loss is nan at step 5" in line and "last finite checkpoint (step 4)" in line, line
    folder = run_dir(project)
    assert (folder / "checkpoint.diverged.pt").is_file()
    assert checkpointing.read_verified(folder / "checkpoint.pt")["batch_in_epoch"] == 0  # epoch 1, step 4
    write_config(project, {"lr": 5.0e-4})
    assert cli(config, "pretrain", "--run", RUN, "--resume-anyway") == 0
    assert [(r["event"], r["step"]) for r in _attempts(project)][-2:] == [("start", 4), ("finished", 8)]


@contextlib.contextmanager
def _mounted_tmpfs(path: Path, options: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): run as root")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_run_folder_is_one_line(project: Path, capsys) -> None:
    """A results folder the user cannot write: one line naming the file and the fix, exit 2."""
    folder = run_dir(project)
    if os.geteuid() != 0:
        folder.mkdir(parents=True)
        folder.chmod(0o555)
        guard = contextlib.nullcontext()
    else:  # root ignores permission bits: a read-only mount is what stops root
        guard = _mounted_tmpfs(folder, "ro,size=1m")
    with guard:
        assert cli(project / "config.yaml", "pretrain", "--run", RUN) == 2
    line = _one_line_error(capsys)
    assert f"{folder}/.densessl.lock" in line, line
    assert ("read-only file system" in line or "permission denied" in line) and "results_dir" in line


def test_full_disk_is_one_line_and_leaves_no_temporary_file(project: Path, capsys) -> None:
    folder = run_dir(project)
    with _mounted_tmpfs(folder, "size=256k"):  # room for the logs, not for a 20 MB checkpoint
        assert cli(project / "config.yaml", "pretrain", "--run", RUN) == 2
        line = _one_line_error(capsys)
        assert "no space left on the device" in line and ".checkpoint.pt." in line, line
        assert sorted(p.name for p in folder.iterdir()) == ["attempts.jsonl", "metrics.jsonl"]
        assert _attempts(project)[-1]["event"] == "failed"


def test_a_second_process_on_the_same_run_exits_at_once(project: Path, capsys) -> None:
    """The first holder is a live process (this test's child); a lock of a dead pid on this host is taken over."""
    import socket

    folder = run_dir(project)
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "since": "2026-01-01T00:00:00"}
        (folder / ".densessl.lock").write_text(json.dumps(lock))
        assert cli(project / "config.yaml", "pretrain", "--run", RUN) == 2
        line = _one_line_error(capsys)
        assert f"already running on {socket.gethostname()} as pid {holder.pid}" in line, line
        assert not (folder / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli(project / "config.yaml", "pretrain", "--run", RUN) == 0  # holder gone: stale lock taken over
    assert not (folder / ".densessl.lock").exists()


def test_a_real_second_pretraining_is_refused(project: Path) -> None:
    """Two `densessl pretrain` processes of one run: the second exits 2 at once naming the first's pid."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "densessl", "pretrain", "--config", str(project / "config.yaml"), "--run", RUN]
    write_config(project, {"epochs": 50})
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run_dir(project) / ".densessl.lock"
        for _ in range(600):
            if (run_dir(project) / "attempts.jsonl").exists():
                break
            assert first.poll() is None
            subprocess.run(["sleep", "0.1"])
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"as pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert json.loads(lock.read_text())["pid"] == first.pid
    finally:
        first.terminate()
        assert first.wait(timeout=120) == 3  # the first one checkpoints on SIGTERM and asks for a requeue


def test_outputs_follow_the_umask(project: Path) -> None:
    old = os.umask(0o002)
    try:
        write_config(project, {"epochs": 1})
        assert cli(project / "config.yaml", "pretrain", "--run", RUN) == 0
    finally:
        os.umask(old)
    for name in ("final.pt", "checkpoint.pt", "train_summary.json", "metrics.jsonl"):
        assert (run_dir(project) / name).stat().st_mode & 0o777 == 0o664, name
    assert not [p for p in run_dir(project).iterdir() if p.name.startswith(".") and p.name != "tensorboard"]


def test_empty_imagenet_train_fails_at_the_data_stage(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    config = write_config(tmp_path, data={"synthetic": False, "roots": {"imagenet": str(tmp_path / "imagenet")}})
    assert cli(config, "data", "--dataset", "imagenet") == 2
    line = _one_line_error(capsys)
    assert f"{tmp_path / 'imagenet' / 'train'}: no images" in line, line
    assert not (tmp_path / "results" / "smoke" / "data" / "imagenet" / "manifest.json").exists()


def test_torn_backbone_file_is_one_line(project: Path, capsys) -> None:
    """An exported backbone cut short (copy interrupted, disk trouble): evaluate names it and says what to do."""
    from densessl.checkpoints.io import save_backbone
    from densessl.models.backbones import create_backbone

    path = run_dir(project) / "backbone.safetensors"
    save_backbone(path, create_backbone("vit-tiny-p8"), "vit-tiny-p8", {}, {})
    path.write_bytes(path.read_bytes()[:1000])
    assert cli(project / "config.yaml", "evaluate", "patchseg_coco", "--run", RUN) == 2
    line = _one_line_error(capsys)
    assert f"{path}: torn or corrupt backbone file" in line and "re-run the convert stage" in line, line
