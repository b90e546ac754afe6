"""DVC and Snakemake plan the same jobs with the same files, for both presets.

Each side is read by its own tool, not by densessl: Snakemake's dry run (`snakemake -n -p`) lists every job
with its input and output files and shell command; DVC's own loader reads the dvc.yaml that `densessl
dvc-yaml` renders and gives each stage's command, dependencies and outputs. The two are matched by the densessl
call they make (`data --dataset coco`, `evaluate davis2017 --run dino/...`).

DVC declares a few files more than Snakemake, each for a reason given in src/densessl/dvc_stages.py: the
synthetic dataset folder and Cityscapes' converted annotations next to a data manifest, a pretraining's
train_summary.json, and the real dataset roots (versioned by content hash); the expected extras are listed
here exactly, so a file declared on one side only fails the test.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from densessl.dvc_stages import CODE

DATASETS = ("imagenet", "imagenet21k", "coco", "ade20k", "davis", "inat", "lvis", "cityscapes", "voc")

Jobs = dict[str, tuple[set[str], set[str]]]  # densessl call -> (input files, output files)


def densessl_call(shell: str) -> str:
    """`... python -m densessl evaluate --config c.yaml --preset smoke davis2017 --run x --threads 1 > log`
    -> `evaluate davis2017 --run x`: the stage and its own arguments, without where settings come from."""
    words = shlex.split(shell.split(" > ")[0], comments=True)  # DVC's ends in `# settings <hash>`
    words = words[words.index("densessl") + 1:]
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--config", "--preset", "--threads"):
            skip = True
        else:
            kept.append(word)
    return " ".join(kept)


def _files(listed: str | None) -> set[str]:
    return set(listed.split(", ")) if listed else set()


def snakemake_jobs(workdir: Path, preset: str) -> Jobs:
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                          str(workdir), "--configfile", str(workdir / "config.yaml"), "--config",
                          f"preset={preset}", "-n", "-p"], capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    jobs: Jobs = {}
    for block in dry.stdout.split("\n\n"):
        lines = block.strip().splitlines()
        rule = next((line for line in lines if line.startswith(("rule ", "localrule "))), None)
        shell = next((line.removeprefix("Shell command: ") for line in lines
                      if line.startswith("Shell command: ") and line != "Shell command: None"), None)
        if rule is None:
            continue
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines if line.startswith("    "))}
        if shell is None:
            assert rule.split()[-1] == "all:", f"a job without a shell command: {block}"
            continue
        call = densessl_call(shell)
        assert call not in jobs, f"two Snakemake jobs make the same call {call!r}"
        jobs[call] = (_files(fields.get("input")), _files(fields.get("output")))
    return jobs


def dvc_jobs(workdir: Path, preset: str) -> Jobs:
    """Render dvc.yaml for the preset into a DVC project of its own and read it back with DVC."""
    env = {**os.environ, "DENSESSL_ROOT": str(REPO), "DVC_NO_ANALYTICS": "1"}
    rendered = subprocess.run([sys.executable, "-m", "densessl", "dvc-yaml", "--preset", preset], cwd=workdir,
                              capture_output=True, text=True, timeout=300, env=env)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    project = workdir / f"dvc-{preset}"
    project.mkdir()
    (project / "dvc.yaml").write_text(rendered.stdout)
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    Repo.init(str(project), no_scm=True)
    jobs: Jobs = {}
    with Repo(str(project)) as repo:
        repo.index.graph  # noqa: B018  (DVC's own checks: overlapping outputs, cycles)
        for stage in repo.index.stages:
            assert f"--preset {preset}" in stage.cmd, stage.cmd
            files = [d for d in stage.deps if not isinstance(d, ParamsDependency)]
            deps = {str(d.def_path) for d in files} - set(sum(CODE.values(), []))
            jobs[densessl_call(stage.cmd)] = (deps, {str(o.def_path) for o in stage.outs})
    return jobs


def dvc_only_files(call: str, outputs: set[str], preset: str, roots: dict[str, str]) -> tuple[set[str], set[str]]:
    """(dependencies, outputs) that a DVC stage declares on top of the Snakemake job making the same call."""
    stage, *args = call.split()
    folder = Path(sorted(outputs)[0]).parent
    if stage == "data":
        dataset = args[args.index("--dataset") + 1]
        extra = {str(folder / "files")} if preset == "smoke" else set()
        if dataset == "cityscapes":
            extra.add(str(folder / "annotations"))
        return ({roots[dataset]} if preset == "paper" else set()), extra
    if stage == "pretrain":
        return set(), {str(folder / "train_summary.json")}
    return set(), set()


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_dvc_stages_and_snakemake_dag_declare_the_same_files(tmp_path, preset):
    roots = {d: str(tmp_path / "datasets" / d) for d in DATASETS}
    config = yaml.safe_load((REPO / "config.yaml").read_text()) or {}
    if preset == "paper":  # real data: each root becomes a dependency of its data stage
        config["data"] = {**config.get("data", {}), "roots": roots}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    snake = snakemake_jobs(tmp_path, preset)
    dvc = dvc_jobs(tmp_path, preset)
    assert set(dvc) == set(snake), (f"only in DVC: {sorted(set(dvc) - set(snake))[:5]}; "
                                    f"only in Snakemake: {sorted(set(snake) - set(dvc))[:5]}")
    assert sum(call.startswith("evaluate ") for call in dvc) > 10 and "report" in dvc
    for call, (snake_inputs, snake_outputs) in snake.items():
        extra_inputs, extra_outputs = dvc_only_files(call, snake_outputs, preset, roots)
        dvc_inputs, dvc_outputs = dvc[call]
        assert dvc_outputs == snake_outputs | extra_outputs, call
        assert dvc_inputs == snake_inputs | extra_inputs, call
