# Helpers that map wildcards to densessl's configuration (no logic beyond lookups).
from pathlib import Path

from densessl.config import EVALUATIONS, stable_hash

RESULTS = str(CFG.results)
RUN_IDS = [r.id for r in CFG.all_runs]
PRETRAIN_IDS = [r.id for r in CFG.pretrain_runs]


def run_id(wildcards):
    return f"{wildcards.method}/{wildcards.name}"


def run_of(wildcards):
    return CFG.run(run_id(wildcards))


def convert_inputs(wildcards):
    run = run_of(wildcards)
    if run.is_random_init:
        return []
    if run.released:  # a local release file is an input; a url is downloaded (and checksummed) by the stage
        # a manually placed file not there yet is no input: the convert job then says where to download it
        # (checkpoints/released.py) instead of Snakemake refusing the whole DAG
        path = CFG.released_spec(run).get("path")
        return [path] if path and Path(path).expanduser().is_file() else []
    return [str(CFG.final_checkpoint(run))]


wildcard_constraints:
    method="[a-z0-9-]+",
    name="[A-Za-z0-9.-]+",
    dataset="[a-z0-9]+",
    protocol="[a-z0-9_.-]+",
