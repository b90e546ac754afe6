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
    resources:
        gpus=0 if CFG.preset == "smoke" else 8,
    shell:
        "{params.cli} pretrain {params.config} --run {params.run} --threads {threads} > {log} 2>&1"
