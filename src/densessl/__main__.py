from densessl.train.requeue import run_cli

raise SystemExit(run_cli())
