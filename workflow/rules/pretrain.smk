from densessl.launch.resources import pretrain_resource, pretrain_resource_keys, pretrain_retries


def _pretrain_resource(key):
    """One resource of a pretraining job from its compute plan (densessl.launch.resources): GPUs, nodes,
    tasks, time limit, segments and the warning signal."""
    return lambda wildcards: pretrain_resource(CFG, run_id(wildcards), key)


rule pretrain:
    input:
        manifest=lambda w: str(CFG.data_manifest(run_of(w).data)),
    output:
        final=f"{RESULTS}/pretrain/{{method}}/{{name}}/final.pt",
    params:
        cli=PY,
        config=CONFIG_ARGS,
        run=run_id,
        settings=lambda w: stable_hash(CFG.pretrain_settings(run_of(w))),
    log:
        f"{RESULTS}/logs/pretrain/{{method}}/{{name}}.log",
    threads: CFG.threads
    # the longest jobs first: the evaluations of the random-init rows then fill the cores around them
    priority: 10
    # a run longer than slurm.max_time is several segments, each ending with exit 3 at its limit and resumed by
    # the next attempt; these come on top of the failure retries
    retries: pretrain_retries(CFG)
    resources:
        **{key: _pretrain_resource(key) for key in pretrain_resource_keys(CFG)},
    shell:
        "{params.cli} pretrain {params.config} --run {params.run} --threads {threads} > {log} 2>&1"
