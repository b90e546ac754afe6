def convert_inputs(wildcards):
    run = run_of(wildcards)
    return [] if run.is_random_init else [str(CFG.final_checkpoint(run))]


rule convert:
    input:
        convert_inputs,
    output:
        weights=f"{RESULTS}/pretrain/{{method}}/{{name}}/backbone.safetensors",
        sidecar=f"{RESULTS}/pretrain/{{method}}/{{name}}/backbone.json",
    params:
        run=run_id,
    log:
        f"{RESULTS}/logs/convert/{{method}}/{{name}}.log",
    threads: 1
    shell:
        "{PY} convert {CONFIG_ARGS} --run {params.run} --threads {threads} > {log} 2>&1"
