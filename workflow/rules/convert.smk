rule convert:
    input:
        convert_inputs,
    output:
        weights=f"{RESULTS}/pretrain/{{method}}/{{name}}/backbone.safetensors",
        sidecar=f"{RESULTS}/pretrain/{{method}}/{{name}}/backbone.json",
    params:
        run=run_id,
        settings=lambda w: stable_hash(CFG.convert_settings(run_of(w))),
    log:
        f"{RESULTS}/logs/convert/{{method}}/{{name}}.log",
    threads: 1
    shell:
        "{PY} convert {CONFIG_ARGS} --run {params.run} --threads {threads} > {log} 2>&1"
