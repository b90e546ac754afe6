rule data:
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        settings=lambda w: stable_hash(CFG.data_settings(w.dataset)),
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    threads: 1
    shell:
        "{PY} data {CONFIG_ARGS} --dataset {wildcards.dataset} > {log} 2>&1"
