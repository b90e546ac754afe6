rule pretrain:
    input:
        manifest=lambda w: str(CFG.data_manifest(run_of(w).data)),
    output:
        final=f"{RESULTS}/pretrain/{{method}}/{{name}}/final.pt",
    params:
        run=run_id,
        settings=lambda w: stable_hash(CFG.pretrain_settings(run_of(w))),
    log:
        f"{RESULTS}/logs/pretrain/{{method}}/{{name}}.log",
    threads: CFG.threads
    # the longest jobs first: the evaluations of the random-init rows then fill the cores around them
    priority: 10
    # on a cluster, a run longer than slurm.max_time is several segments, each ending with exit 3 at its limit and
    # resumed by the next job; these come on top of the failure retries. Only the main Snakemake process resubmits:
    # the one inside a job must not rerun the command in the same, expiring allocation (0). Locally: --retries.
    retries: (pretrain_retries(CFG) if workflow.non_local_exec else None) if workflow.is_main_process else 0
    resources:
        **{key: _pretrain_resource(key) for key in pretrain_resource_keys(CFG)},
    shell:
        "{PY} pretrain {CONFIG_ARGS} --run {params.run} --threads {threads} > {log} 2>&1"
