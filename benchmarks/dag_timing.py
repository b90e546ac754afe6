"""Print how long `snakemake -n` takes on the default config (target: under 5 s), best of N runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(repeats: int = 3) -> None:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-q"], cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            sys.exit(out.stderr)
    print(f"snakemake -n: best {min(times):.2f} s, mean {sum(times) / len(times):.2f} s over {repeats} runs")


if __name__ == "__main__":
    main()
