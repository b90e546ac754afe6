# Helpers that map wildcards to densessl's configuration (no logic beyond lookups).
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
    if run.released:  # a local release file once placed (Config.release_inputs); a url is downloaded by the stage
        return CFG.release_inputs(run)
    return [str(CFG.final_checkpoint(run))]


wildcard_constraints:
    method="[a-z0-9-]+",
    name="[A-Za-z0-9.-]+",
    dataset="[a-z0-9]+",
    protocol="[a-z0-9_.-]+",


from densessl.launch.resources import pretrain_resource, pretrain_resource_keys, pretrain_retries


def _pretrain_resource(key):
    """One resource of a pretraining job from its compute plan (densessl.launch.resources): GPUs, nodes,
    tasks, time limit, segments and the warning signal."""
    return lambda wildcards: pretrain_resource(CFG, run_id(wildcards), key)
