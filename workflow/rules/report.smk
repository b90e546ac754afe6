rule report:
    input:
        metrics=[str(CFG.eval_metrics(p, r)) for p in CFG.evaluations for r in CFG.all_runs],
    output:
        [str(p) for p in CFG.report_outputs()],
    log:
        f"{RESULTS}/logs/report.log",
    threads: 1
    shell:
        "{PY} report {CONFIG_ARGS} > {log} 2>&1"
