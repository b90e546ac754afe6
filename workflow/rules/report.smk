rule report:
    input:
        metrics=[str(CFG.eval_metrics(p, r)) for p, r in CFG.evaluation_jobs()],
    output:
        [str(p) for p in CFG.report_outputs()],
    params:
        cli=PY,
        config=CONFIG_ARGS,
    log:
        f"{RESULTS}/logs/report.log",
    threads: 1
    shell:
        "{params.cli} report {params.config} > {log} 2>&1"
