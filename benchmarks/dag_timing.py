"""Print how long `snakemake -n` takes on the default config (target: under 5 s), best of N runs: wall time and
CPU time (user+sys of the snakemake process, which a shared machine does not inflate).

``--uncached`` deletes the settings check's cache (results/<preset>/.settings-check.json) before each run, so
every run type-checks every stage's settings (densessl.settings_check), as the first dry run after a change does.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(repeats: int = 3, uncached: bool = False) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from densessl.config import load_config
    from densessl.settings_check import CACHE_NAME

    cache = REPO / load_config([REPO / "config.yaml"], root=REPO, check_settings=False).results / CACHE_NAME
    walls, cpus = [], []
    for _ in range(repeats):
        if uncached:
            cache.unlink(missing_ok=True)
        start, cpu0 = time.perf_counter(), _children_cpu()
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-q"], cwd=REPO, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        cpus.append(_children_cpu() - cpu0)
        if out.returncode != 0:
            sys.exit(out.stderr)
    what = "settings check uncached" if uncached else "settings check cached after the first run"
    print(f"snakemake -n ({what}): wall best {min(walls):.2f} s, mean {sum(walls) / len(walls):.2f} s; "
          f"CPU best {min(cpus):.2f} s, mean {sum(cpus) / len(cpus):.2f} s over {repeats} runs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uncached", action="store_true")
    args = parser.parse_args()
    main(args.repeats, args.uncached)
