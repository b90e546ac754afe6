"""workflow/lint.py: `snakemake --lint` that waives only the per-rule conda lint and the two outside variables of
the shell commands (see its docstring)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

CLEAN_BUT_CONDA = '''rule a:
    output: "a.txt"
    log: "a.log"
    shell: "touch {output} 2> {log}"
'''
OTHER_OUTSIDE_VARIABLE = '''TOOL = "touch"
rule a:
    output: "a.txt"
    log: "a.log"
    shell: "{TOOL} {output} 2> {log}"
'''
NO_LOG = '''rule a:
    output: "a.txt"
    shell: "touch {output}"
'''


def _lint(tmp_path, snakefile: str) -> subprocess.CompletedProcess:
    (tmp_path / "Snakefile").write_text(snakefile)
    return subprocess.run([sys.executable, str(REPO / "workflow" / "lint.py"), "-s", str(tmp_path / "Snakefile"),
                           "--directory", str(tmp_path)], capture_output=True, text=True, timeout=120)


def test_only_the_conda_lint_is_waived(tmp_path):
    ok = _lint(tmp_path, CLEAN_BUT_CONDA)
    assert ok.returncode == 0 and "1 waived" in ok.stdout, ok.stdout + ok.stderr
    bad = _lint(tmp_path, NO_LOG)
    assert bad.returncode == 1 and "No log directive defined" in bad.stderr, bad.stdout + bad.stderr


def test_only_the_named_outside_variables_are_waived(tmp_path):
    bad = _lint(tmp_path, OTHER_OUTSIDE_VARIABLE)
    assert bad.returncode == 1 and "uses variable TOOL from outside" in bad.stderr, bad.stdout + bad.stderr
    named = _lint(tmp_path, OTHER_OUTSIDE_VARIABLE.replace("TOOL", "PY"))
    assert named.returncode == 0, named.stdout + named.stderr
