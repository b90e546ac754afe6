"""`dvc repro` in a copy of the repository: one stage and the default remote round trip, and a whole pipeline.

The copy holds the files git tracks (and new ones it does not ignore), as a fresh clone would, so the
committed .dvc/config, .dvcignore and dvc.yaml are what is tested: the stage runs, a second `dvc repro` does
nothing, a new byte-code cache changes nothing, `dvc push` fills the default remote beside the clone, and after
the cache and the outputs are deleted `dvc pull` brings back the same bytes. The second test renders a
pipeline of a few tiny stages, runs all of it with `dvc repro`, and checks that `dvc repro` then does nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

STAGE = "data_davis"  # the cheapest stage: a few MB of synthetic DAVIS clips
OUTPUTS = ("results/smoke/data/davis/manifest.json", "results/smoke/data/davis/files")


def copy_tracked(src: Path, dst: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (src / rel).is_file():  # a file deleted in the working tree but still in the index is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def snapshot(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for out in OUTPUTS:
        path = root / out
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[f.relative_to(root).as_posix()] = f.read_bytes()
    return files


@pytest.fixture
def dvc_project(tmp_path):
    repo = tmp_path / "repo"
    copy_tracked(REPO, repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DENSESSL_", "DVC_"))}
    # the stage's `python` is this interpreter, importing the copy's package (not the editable install)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(repo / "src"),
               DVC_NO_ANALYTICS="1")

    def dvc(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    return repo, dvc


@pytest.mark.e2e
def test_repro_one_stage_then_push_and_pull_restore_the_same_bytes(dvc_project, tmp_path):
    repo, dvc = dvc_project
    ran = dvc("repro", STAGE)
    assert f"Running stage '{STAGE}'" in ran
    assert "Running stage 'data_imagenet'" not in ran  # one stage, not the pipeline
    made = snapshot(repo)
    assert "results/smoke/data/davis/manifest.json" in made and len(made) > 10
    manifest = repo / OUTPUTS[0]
    written = manifest.stat().st_mtime_ns

    again = dvc("repro", STAGE)
    assert f"Stage '{STAGE}' didn't change, skipping" in again and "Running stage" not in again
    assert manifest.stat().st_mtime_ns == written
    assert "up to date" in dvc("status", STAGE)

    # importing the package writes __pycache__/*.pyc into the stage's code dependencies: not a change
    for package in ("src/densessl/data", "src/densessl/data/synthetic", "src/densessl/stages"):
        cache = repo / package / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "new_module.cpython-311.pyc").write_bytes(b"\x00" * 16)
    assert "up to date" in dvc("status", STAGE)
    # while a change to the code is one (so the check above can fail)
    source = repo / "src/densessl/data/davis.py"
    original = source.read_bytes()
    source.write_bytes(original + b"\n# edited\n")
    assert "modified:" in dvc("status", STAGE) and "src/densessl/data" in dvc("status", STAGE)
    source.write_bytes(original)
    assert "up to date" in dvc("status", STAGE)

    # the default remote (.dvc/config) is the folder beside the clone, shared with the group like the cache
    dvc("push")
    remote = tmp_path / "densessl-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*.dir"))
    for folder in (remote / "files" / "md5", repo / ".dvc" / "cache" / "files" / "md5"):
        mode = folder.stat().st_mode
        assert mode & stat.S_IWGRP and mode & stat.S_ISGID, f"{folder}: {stat.filemode(mode)}"

    shutil.rmtree(repo / ".dvc" / "cache")
    manifest.unlink()
    shutil.rmtree(repo / OUTPUTS[1])
    assert not manifest.exists() and "not in cache" in dvc("status", STAGE)
    dvc("pull", STAGE)  # a bare `dvc pull` also asks for the stages that never ran, and fails on them
    assert snapshot(repo) == made
    assert "up to date" in dvc("status", STAGE)


TINY_TRAIN = {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0, "checkpoint_every_steps": 2}
TINY = {  # one pretraining, its random-init row, one frozen-feature protocol, on tiny synthetic data
    "threads": 1,
    "runs": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"}],
    "random_init_seeds": [0],
    "baselines": {"supervised_reference": []},
    "evaluations": ["patchseg_coco"],
    "data": {"synthetic_size": "tiny"},
    "pretrain": {"dino": {"train": TINY_TRAIN}},
    "evaluate": {"patchseg": {"epochs": 1, "batch_size": 4, "warmup_steps": 2}},
}


@pytest.mark.e2e
def test_repro_of_a_whole_pipeline_then_repro_does_nothing(dvc_project):
    repo, dvc = dvc_project
    (repo / "config.yaml").write_text(yaml.safe_dump(TINY))
    rendered = subprocess.run([sys.executable, "-m", "densessl", "dvc-yaml"], cwd=repo, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo / "src")})
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    (repo / "dvc.yaml").write_text(rendered.stdout)
    names = list(yaml.safe_load(rendered.stdout)["stages"])
    assert len(names) == 8 and names[-1] == "report"  # 2 datasets, pretrain, 2 converts, 2 evaluations, report

    ran = dvc("repro")
    assert all(f"Running stage '{name}'" in ran for name in names), ran[-3000:]
    report = repo / "results/smoke/report/tables.json"
    assert report.is_file()
    written = report.stat().st_mtime_ns

    again = dvc("repro")
    assert "Running stage" not in again and "Data and pipelines are up to date." in again, again[-3000:]
    assert report.stat().st_mtime_ns == written
    assert "Data and pipelines are up to date." in dvc("status")
