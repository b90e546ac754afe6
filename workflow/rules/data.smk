rule data:
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        cli=PY,
        config=CONFIG_ARGS,
        settings=lambda w: stable_hash(CFG.data_settings(w.dataset)),
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    threads: 1
    # Rule priorities do not pass to a job's inputs: without this the pretrainings' data (the head of the
    # critical path) waited behind random-init conversions and evaluations, 3 minutes in a fresh smoke run.
    priority: 20
    shell:
        "{params.cli} data {params.config} --dataset {wildcards.dataset} > {log} 2>&1"
