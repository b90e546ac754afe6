# densessl: the whole reproduction as one DAG. Rules only declare files and call `python -m densessl`;
# all logic (paths, settings, validation) lives in src/densessl. See README.md.
import sys
from pathlib import Path

from densessl.config import check_snakemake_overrides, load_config, load_yaml, snakemake_config_files

# Before `configfile:` reads it: a YAML error is reported with its line (Snakemake's parser names none), and
# `--config` keys other than preset, which nothing would read, are refused.
load_yaml(Path("config.yaml").resolve())
check_snakemake_overrides(dict(workflow.config_settings.config))

configfile: "config.yaml"


# The preset may be overridden with `--config preset=paper`; other settings belong in config files.
CONFIG_FILES = snakemake_config_files(workflow.configfiles, Path.cwd())
CFG = load_config(CONFIG_FILES, preset=config.get("preset"), root=Path(workflow.basedir))
CONFIG_ARGS = " ".join(f"--config {f}" for f in CONFIG_FILES) + f" --preset {CFG.preset}"
# CONFIG_ARGS and PY appear in the rules' shell commands by name, not as params: Snakemake reruns a job whose
# params change, and the config file list, the checkout's path and the interpreter's say nothing about a job's
# output. What does is each rule's `settings` param (a hash of the settings that job reads), so an added override
# file reruns only the jobs whose settings it changes (tests/test_convert_rule.py), and a new path of the checkout
# or of the venv none for that reason.
# The interpreter running Snakemake (the project venv) also runs every stage, locally or on SLURM nodes.
# `exec`: the stage replaces the rule's bash, which would otherwise die of the SIGTERM that SLURM sends every
# process of the job step before a time limit or preemption, and end the step before the stage has saved its
# state and requeued the job (each rule's shell is this one command).
PY = f"DENSESSL_ROOT={workflow.basedir} exec {sys.executable} -m densessl"

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        [str(p) for p in CFG.all_targets()],
    default_target: True
