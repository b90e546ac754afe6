rule evaluate:
    input:
        backbone=lambda w: str(CFG.backbone(run_of(w))),
        manifest=lambda w: str(CFG.data_manifest(EVALUATIONS[w.protocol]["dataset"])),
    output:
        metrics=report(f"{RESULTS}/eval/{{protocol}}/{{method}}/{{name}}/metrics.json",
                       caption="../report/evaluate.rst", category="Evaluations", subcategory="{protocol}",
                       labels={"protocol": "{protocol}", "run": "{method}/{name}"}),
    params:
        run=run_id,
        settings=lambda w: stable_hash(CFG.eval_settings(w.protocol)),
    log:
        f"{RESULTS}/logs/eval/{{protocol}}/{{method}}/{{name}}.log",
    threads: 1
    # the slurm profile's evaluate entry sets no gpu count: this gives the detection protocols their 8
    resources:
        gpus=lambda w: CFG.eval_gpus(w.protocol),
        gpu=lambda w: CFG.eval_gpus(w.protocol),
    shell:
        "{PY} evaluate {wildcards.protocol} {CONFIG_ARGS} --run {params.run} --threads {threads} > {log} 2>&1"
