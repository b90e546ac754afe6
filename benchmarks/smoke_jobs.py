"""Print the CPU time of every job of a finished (or partly finished) DAG, per job kind, and the 2-core wall time
it implies, from the ``densessl cpu:`` line each stage writes at the end of its log (``densessl.cputime``).

Why CPU time: on a shared machine a job's wall time depends on its neighbours, its user+sys time does not. Each
job runs one thread, so its CPU time is also about its wall time on a core of its own. On ``cores`` cores the
DAG then takes at least max(critical path, total / cores) and, by Graham's bound for any scheduler that keeps
cores busy while jobs are ready, at most total / cores + (1 - 1 / cores) × critical path. The critical path is
the longest chain data → pretrain → convert → evaluate → report, each job counted at its CPU time.

    python benchmarks/smoke_jobs.py                       # results/smoke, the jobs listed one per line
    python benchmarks/smoke_jobs.py --kinds               # one line per job kind
    python benchmarks/smoke_jobs.py --results results/smoke --cores 2 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from densessl.cputime import CpuRecord, parse_line  # noqa: E402


@dataclass(frozen=True)
class Job:
    """One stage log: results/<preset>/logs/<stage>/<...>.log."""

    kind: str       # data | pretrain/<method> | convert | eval/<protocol> | report
    name: str       # the log's path under logs/, without .log
    record: CpuRecord | None
    done: bool      # its declared output exists (a failed job's log has a CPU line too)


def job_kind(rel: Path) -> str:
    parts = rel.parts
    if parts[0] == "pretrain":
        return f"pretrain/{parts[1]}"
    if parts[0] == "eval":
        return f"eval/{parts[1]}"
    if parts[0] == "convert":
        return "convert/random-init" if parts[1] == "random-init" else "convert"
    return parts[0].removesuffix(".log")


def _output(results: Path, rel: Path) -> Path:
    """The file a stage log's job declares (workflow/rules/*.smk)."""
    stage, rest = rel.parts[0], Path(*rel.parts[1:]).with_suffix("") if len(rel.parts) > 1 else Path()
    if stage == "data":
        return results / "data" / rest / "manifest.json"
    if stage == "pretrain":
        return results / "pretrain" / rest / "final.pt"
    if stage == "convert":
        return results / "pretrain" / rest / "backbone.safetensors"
    if stage == "eval":
        return results / "eval" / rest / "metrics.json"
    return results / "report" / "checks.json"


def read_jobs(results: Path) -> list[Job]:
    logs = results / "logs"
    if not logs.is_dir():
        raise SystemExit(f"{logs}: no stage logs; run the DAG first (make smoke, or snakemake <target>)")
    jobs = []
    for path in sorted(logs.rglob("*.log")):
        rel = path.relative_to(logs)
        record = None
        for line in path.read_text(errors="replace").splitlines()[-50:]:
            record = parse_line(line) or record
        jobs.append(Job(job_kind(rel), rel.with_suffix("").as_posix(), record, _output(results, rel).is_file()))
    return jobs


def _run_data(run_name: str) -> str | None:
    """'vit-tiny-p8-imagenet' → 'imagenet'; random-init names ('vit-tiny-p8-seed0') have no data."""
    tail = run_name.rsplit("-", 1)[-1]
    return None if tail.startswith("seed") else tail


def critical_path(jobs: list[Job]) -> tuple[float, list[str]]:
    """The longest chain of CPU seconds data → pretrain → convert → evaluate → report among the logged jobs."""
    from densessl.config import EVALUATIONS

    cpu = {j.name: j.record.cpu_s for j in jobs if j.record is not None and j.done}

    def ready_backbone(run: str) -> tuple[float, list[str]]:  # run = "<method>/<name>"
        chain: list[str] = []
        total = 0.0
        data = _run_data(run.split("/", 1)[1])
        if data and not run.startswith("random-init/"):
            for name in (f"data/{data}", f"pretrain/{run}"):
                if name in cpu:
                    total += cpu[name]
                    chain.append(name)
        if f"convert/{run}" in cpu:
            total += cpu[f"convert/{run}"]
            chain.append(f"convert/{run}")
        return total, chain

    best: tuple[float, list[str]] = (0.0, [])
    for name, seconds in cpu.items():
        if not name.startswith("eval/"):
            continue
        _, protocol, run = name.split("/", 2)
        before = ready_backbone(run)
        dataset = (EVALUATIONS.get(protocol) or EVALUATIONS.get(protocol.split(".")[0]) or {}).get("dataset")
        data_first = (cpu.get(f"data/{dataset}", 0.0), [f"data/{dataset}"])
        start = max(before, data_first, key=lambda c: c[0])
        best = max(best, (start[0] + seconds, start[1] + [name]), key=lambda c: c[0])
    if "report" in cpu:
        best = (best[0] + cpu["report"], best[1] + ["report"])
    return best


def summarise(jobs: list[Job], cores: int) -> dict:
    timed = [j for j in jobs if j.record is not None and j.done]
    kinds: dict[str, list[Job]] = defaultdict(list)
    for j in timed:
        kinds[j.kind].append(j)
    total = sum(j.record.cpu_s for j in timed)
    startup = sum(j.record.startup_s for j in timed)
    path_s, path = critical_path(jobs)
    return {
        "jobs": len(timed),
        "jobs_without_cpu_line": [j.name for j in jobs if j.record is None],
        "failed_or_unfinished": [j.name for j in jobs if j.record is not None and not j.done],
        "cpu_s": round(total, 1),
        "startup_s": round(startup, 1),
        "critical_path_s": round(path_s, 1),
        "critical_path": path,
        "cores": cores,
        "wall_lower_s": round(max(path_s, total / cores), 1),
        "wall_upper_s": round(total / cores + (1 - 1 / cores) * path_s, 1),
        "kinds": {k: {"jobs": len(v), "cpu_s": round(sum(j.record.cpu_s for j in v), 1),
                      "mean_cpu_s": round(sum(j.record.cpu_s for j in v) / len(v), 2),
                      "mean_startup_s": round(sum(j.record.startup_s for j in v) / len(v), 2)}
                  for k, v in sorted(kinds.items())},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "results" / "smoke")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--kinds", action="store_true", help="one line per job kind instead of per job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    jobs = read_jobs(args.results)
    summary = summarise(jobs, args.cores)
    if args.json:
        print(json.dumps({**summary, "per_job": [{"name": j.name, "kind": j.kind, "done": j.done,
                                                    **(asdict(j.record) if j.record else {})} for j in jobs]},
                         indent=2))
        return
    if args.kinds:
        print(f"{'job kind':32} {'jobs':>4} {'CPU s':>8} {'mean':>7} {'start-up':>8}")
        for kind, row in summary["kinds"].items():
            print(f"{kind:32} {row['jobs']:4d} {row['cpu_s']:8.1f} {row['mean_cpu_s']:7.2f} "
                  f"{row['mean_startup_s']:8.2f}")
    else:
        print(f"{'job':70} {'CPU s':>8} {'start-up':>8} {'wall s':>8}")
        for j in jobs:
            r = j.record
            line = f"{r.cpu_s:8.2f} {r.startup_s:8.2f} {r.wall_s:8.2f}" if r else "      no CPU line"
            print(f"{j.name:70} {line}" + ("" if j.done or not r else "  (no output: failed, not counted)"))
    s = summary
    print(f"\n{s['jobs']} jobs: {s['cpu_s']:.0f} CPU s, of which start-up {s['startup_s']:.0f} s "
          f"({100 * s['startup_s'] / max(s['cpu_s'], 1e-9):.0f} %); critical path {s['critical_path_s']:.0f} s "
          f"({' → '.join(s['critical_path'])})")
    print(f"on {s['cores']} cores: {s['wall_lower_s'] / 60:.1f}–{s['wall_upper_s'] / 60:.1f} min "
          f"(max(path, CPU/cores) – CPU/cores + (1-1/cores)·path)")
    if s["failed_or_unfinished"]:
        print(f"{len(s['failed_or_unfinished'])} job(s) without their output, not counted: "
              f"{', '.join(s['failed_or_unfinished'][:5])}")
    if s["jobs_without_cpu_line"]:
        print(f"{len(s['jobs_without_cpu_line'])} log(s) without a CPU line (running, killed, or older code): "
              f"{', '.join(s['jobs_without_cpu_line'][:5])}")


if __name__ == "__main__":
    main()
