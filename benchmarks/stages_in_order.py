"""Run every stage of the configured DAG through `python -m densessl`, in dependency order, without Snakemake.

    python benchmarks/stages_in_order.py [--preset smoke] [--pretrain-jobs 5] [--eval-jobs 12] [--threads 2]

For machines that have the package but not Snakemake (GPU machines often lack it): it times the stages
the Snakefile would run, layer by layer (data → pretrain → convert → evaluate → report), several jobs of a
layer side by side, and prints each stage's wall time and the total. Logs go to
`<results>/logs/stages_in_order/`. It always runs every stage (no up-to-date checks: that is Snakemake's
job), so point it at an empty results folder. The smoke DAG figure in docs/performance.md (3 min 34 s on an
H100, 5 pretraining and 12 evaluation jobs) was measured with the conversions run 8 at a time rather than 12.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from densessl.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--preset", default="smoke", choices=["smoke", "paper"])
    ap.add_argument("--pretrain-jobs", type=int, default=2)
    ap.add_argument("--eval-jobs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per stage")
    args = ap.parse_args()
    cfg = load_config([args.config], preset=args.preset)
    logs = Path(cfg.results) / "logs" / "stages_in_order"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--config", args.config, "--preset", args.preset, "--threads", str(args.threads)]

    def stage(*words: str) -> None:
        name = "_".join(w.replace("/", "-") for w in words)
        start = time.time()
        with open(logs / f"{name}.log", "w", encoding="utf-8") as log:
            code = subprocess.run([sys.executable, "-m", "densessl", *words, *common], stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        print(f"{time.time() - start:7.1f} s  rc={code}  {' '.join(words)}", flush=True)
        if code:
            raise SystemExit(f"stage failed: {' '.join(words)}; log: {logs / f'{name}.log'}")

    def layer(jobs: int, calls: list[tuple[str, ...]]) -> None:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(lambda words: stage(*words), calls))

    started = time.time()
    layer(len(cfg.datasets), [("data", "--dataset", d) for d in cfg.datasets])
    layer(args.pretrain_jobs, [("pretrain", "--run", r.id) for r in cfg.pretrain_runs])
    layer(args.eval_jobs, [("convert", "--run", r.id) for r in cfg.all_runs])
    layer(args.eval_jobs, [("evaluate", p, "--run", r.id) for p, r in cfg.evaluation_jobs()])
    stage("report")
    print(f"total {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
