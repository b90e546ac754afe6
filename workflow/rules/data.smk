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
    shell:
        "{params.cli} data {params.config} --dataset {wildcards.dataset} > {log} 2>&1"
