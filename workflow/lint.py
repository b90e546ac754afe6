"""`snakemake --lint`, failing on every lint but one: "Specify a conda environment or container for each rule".

Why that one is waived: every rule runs ``python -m densessl`` with the interpreter that runs Snakemake (the
project environment made by `make env` or envs/environment.yml, the same on a laptop and on SLURM nodes), so
a per-rule ``conda:`` directive would document an environment the rule does not use.

    python workflow/lint.py [snakemake arguments, e.g. --configfile config.yaml]
"""

from __future__ import annotations

import re
import subprocess
import sys

WAIVED = {"Specify a conda environment or container for each rule."}


def main(argv: list[str]) -> int:
    run = subprocess.run([sys.executable, "-m", "snakemake", "--lint", *argv], capture_output=True, text=True)
    text = run.stdout + run.stderr
    titles = re.findall(r"^\s+\* (.+?):\s*$", text, flags=re.MULTILINE)
    if run.returncode != 0 and not titles:  # snakemake failed before linting (syntax, config): show why
        print(text, file=sys.stderr)
        return run.returncode
    remaining = [t for t in titles if t not in WAIVED]
    if remaining:
        print(text, file=sys.stderr)
        print(f"snakemake --lint: {len(remaining)} lint(s) to fix: {sorted(set(remaining))}", file=sys.stderr)
        return 1
    print(f"snakemake --lint: clean ({len(titles)} waived: per-rule conda environments, see workflow/lint.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
