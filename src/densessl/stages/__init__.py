"""One function per DAG stage; cli.py parses arguments, Snakemake rules and DVC stages call the CLI."""
