# `snakemake --report workflow.html`: the workflow view (DAG, run times) with the report stage's outputs and the
# evaluations' metrics.json, each with its caption in workflow/report/.
report: "../report/workflow.rst"

REPORT_CAPTIONS = {"index.html": "index_html.rst", "report.md": "report_md.rst", "tables.json": "tables_json.rst",
                   "checks.json": "checks_json.rst"}


rule report:
    input:
        metrics=[str(CFG.eval_metrics(p, r)) for p, r in CFG.evaluation_jobs()],
    output:
        [report(str(p), caption=f"../report/{REPORT_CAPTIONS[p.name]}", category="Report")
         for p in CFG.report_outputs()],
    params:
        # the report reads the whole configuration (tables, baselines, checks): any edit rebuilds it (seconds)
        settings=stable_hash(CFG.data),
    log:
        f"{RESULTS}/logs/report.log",
    threads: 1
    shell:
        "{PY} report {CONFIG_ARGS} > {log} 2>&1"
