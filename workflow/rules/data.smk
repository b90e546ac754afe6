rule data:
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        settings=lambda w: stable_hash(CFG.data_settings(w.dataset)),
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    threads: 1
    # Rule priorities do not pass to a job's inputs: without this the pretrainings' data (the head of the
    # critical path) waits behind random-init jobs (3 minutes in a fresh smoke run). On 2 busy cores this
    # changes the order, not measurably the total; on a cluster it starts the long jobs first.
    priority: 20
    shell:
        "{PY} data {CONFIG_ARGS} --dataset {wildcards.dataset} > {log} 2>&1"
