"""`snakemake --lint`, failing on every lint but these:

* "Specify a conda environment or container for each rule": every rule runs ``python -m densessl`` with the
  interpreter that runs Snakemake (the project environment made by `make env` or envs/environment.yml, the same
  on a laptop and on SLURM nodes), so a per-rule ``conda:`` directive would document an environment the rule
  does not use;
* "Shell command directly uses variable PY / CONFIG_ARGS from outside of the rule", for those two names only:
  the lint asks for them as params, and Snakemake reruns a job whose params change, while the interpreter's
  path, the checkout's and the list of config files say nothing about a job's output (each rule's ``settings``
  param does; the Snakefile says more). Any other outside variable in a shell command still fails.

    python workflow/lint.py [snakemake arguments, e.g. --configfile config.yaml]
"""

from __future__ import annotations

import re
import subprocess
import sys

WAIVED = {"Specify a conda environment or container for each rule.",
          "Shell command directly uses variable PY from outside of the rule",
          "Shell command directly uses variable CONFIG_ARGS from outside of the rule"}


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
    print(f"snakemake --lint: clean ({len(titles)} waived: per-rule conda environments, the stage command and "
          f"config files in the shell commands; see workflow/lint.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
