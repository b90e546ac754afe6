def convert_settings(wildcards):
    """What determines an exported backbone besides its input files, hashed so that Snakemake reruns the export
    when it changes (params are a rerun trigger). A released entry's url / sha256 / path / format / options are
    not files: without this, editing e.g. options.checkpoint_key left the old backbone.safetensors "up to date".
    Random-init rows: the architecture, variant (its create_backbone and init kwargs, code that has changed
    before, see models/variants.py) and seed. Pretrained runs: their pretrain settings (as the pretrain rule)."""
    from densessl.models.variants import variant_init_kwargs, variant_kwargs

    run = run_of(wildcards)
    if run.released:
        return stable_hash({"released": CFG.released_spec(run)})
    if run.is_random_init:
        return stable_hash({"random_init": {"arch": run.arch, "variant": run.variant, "seed": run.seed,
                                            "arch_kwargs": variant_kwargs(run.variant),
                                            "init_kwargs": variant_init_kwargs(run.variant)}})
    return stable_hash({"pretrained": CFG.pretrain_settings(run)})


rule convert:
    input:
        convert_inputs,
    output:
        weights=f"{RESULTS}/pretrain/{{method}}/{{name}}/backbone.safetensors",
        sidecar=f"{RESULTS}/pretrain/{{method}}/{{name}}/backbone.json",
    params:
        cli=PY,
        config=CONFIG_ARGS,
        run=run_id,
        settings=convert_settings,
    log:
        f"{RESULTS}/logs/convert/{{method}}/{{name}}.log",
    threads: 1
    shell:
        "{params.cli} convert {params.config} --run {params.run} --threads {threads} > {log} 2>&1"
