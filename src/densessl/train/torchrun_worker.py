"""What every torchrun worker the launcher starts runs: ``python -m <module> <argv>``, with the module and its
command line read from ``DENSESSL_WORKER_ARGV`` (JSON) instead of torchrun's own command line.

Why: torchrun classifies every word of its command line with argparse, the words after the script name too, and
argparse's prefix matching then either rejects a stage's option (``--run`` is ambiguous with torchrun's
``--run-path``/``--run_path``: "ambiguous option", exit 2, no worker started) or takes it as torchrun's own (any
unique prefix, ``--ro`` for ``--role``). Through the environment the stage's words reach the worker unparsed.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

WORKER_ARGV_ENV = "DENSESSL_WORKER_ARGV"


def worker_spec(module: str, argv: list[str]) -> str:
    """The ``DENSESSL_WORKER_ARGV`` value that makes a worker run ``python -m module *argv``."""
    return json.dumps({"module": module, "argv": list(argv)})


def main() -> None:
    raw = os.environ.get(WORKER_ARGV_ENV)
    if not raw:
        raise SystemExit(f"densessl.train.torchrun_worker: {WORKER_ARGV_ENV} is not set; this module is started "
                         f"by the densessl launcher (densessl.train.launch), not by hand")
    spec = json.loads(raw)
    sys.argv = [spec["module"], *spec["argv"]]
    runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
