# densessl: the whole reproduction as one DAG. Rules only declare files and call `python -m densessl`;
# all logic (paths, settings, validation) lives in src/densessl. See README.md.
import sys
from pathlib import Path

from densessl.config import load_config

configfile: "config.yaml"


def config_files():
    """The config files in merge order, each once, relative to the working directory where possible.

    `configfile:` above and a `--configfile config.yaml` on the command line name the same file (one
    absolute, one relative); rule params hold these paths, so `make smoke` and a plain `snakemake` must spell
    them identically or Snakemake would rerun every job for "params changed"."""
    seen, out = set(), []
    for f in workflow.configfiles:
        path = Path(f).resolve()
        if path in seen:
            continue
        seen.add(path)
        out.append(str(path.relative_to(Path.cwd().resolve())) if path.is_relative_to(Path.cwd().resolve())
                   else str(path))
    return out


# The preset may be overridden with `--config preset=paper`; other settings belong in config files.
CFG = load_config(config_files(), preset=config.get("preset"), root=Path(workflow.basedir))
CONFIG_ARGS = " ".join(f"--config {f}" for f in config_files()) + f" --preset {CFG.preset}"
# The interpreter running Snakemake (the project venv) also runs every stage, locally or on SLURM nodes.
PY = f"DENSESSL_ROOT={workflow.basedir} {sys.executable} -m densessl"

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
