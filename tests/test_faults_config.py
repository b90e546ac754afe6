"""Configuration faults found before any job runs: wrong types and unknown keys inside a method's, the
trainer's and a protocol's settings, YAML syntax errors (with their line), and `snakemake --config` keys that
nothing reads. `snakemake -n` itself must fail on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from densessl.config import load_config
from densessl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("pretrain:\n  dino:\n    train:\n      lr: 1e-3\n",
     "pretrain.dino.train.lr: '1e-3' is a str, expected float (YAML reads 1e-3 as text"),
    ("pretrain:\n  dino:\n    train:\n      epochs: 2.5\n", "pretrain.dino.train.epochs: 2.5 is a float, expected int"),
    ("pretrain:\n  dino:\n    train:\n      learning_rate: 0.001\n",
     "pretrain.dino.train: unknown field(s) ['learning_rate']"),
    ("pretrain:\n  loca:\n    method:\n      query_size: large\n", "pretrain.loca.method.query_size: 'large' is a str"),
    ("evaluate:\n  patchseg:\n    epochs: ten\n", "evaluate.patchseg.epochs: 'ten' is a str, expected int"),
    ("evaluate:\n  linear_seg:\n    iteration: 10\n", "evaluate.linear_seg: unknown field(s) ['iteration']"),
])
def test_stage_settings_are_type_checked_at_load(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([_config(tmp_path, "preset: smoke\n" + text)], root=REPO)
    assert expected in str(err.value)


def test_yaml_error_names_the_line(tmp_path: Path) -> None:
    path = _config(tmp_path, "preset: smoke\nthreads: 1\nruns: [\n  {method: dino\n")
    with pytest.raises(ConfigError, match=rf"{path}:5:1: not valid YAML"):
        load_config([path], root=REPO)


def _dry_run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(SNAKEMAKE.parent) + ":/usr/bin:/bin", "PYTHONPATH": str(REPO / "src"), "HOME": str(folder)}
    return subprocess.run([str(SNAKEMAKE), "-n", "-s", str(REPO / "Snakefile"), "-d", str(folder), *args],
                          cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def test_snakemake_dry_run_fails_on_settings_yaml_and_unread_config_keys(tmp_path: Path) -> None:
    _config(tmp_path, "preset: smoke\npretrain:\n  dino:\n    train:\n      lr: 1e-3\n")
    done = _dry_run(tmp_path)
    assert done.returncode != 0 and "pretrain.dino.train.lr: '1e-3' is a str, expected float" in done.stdout
    _config(tmp_path, "preset: smoke\nthreads: [1\n")
    done = _dry_run(tmp_path)
    assert done.returncode != 0 and f"{tmp_path / 'config.yaml'}:3:1: not valid YAML" in done.stdout, done.stdout
    _config(tmp_path, "preset: smoke\n")
    done = _dry_run(tmp_path, "--config", "threads=4")
    assert done.returncode != 0 and "snakemake --config: unsupported key(s) ['threads']" in done.stdout
    assert _dry_run(tmp_path, "--config", "preset=smoke").returncode == 0
