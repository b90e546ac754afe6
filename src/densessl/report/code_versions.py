"""Which code produced each number: the report flags results made by other code than the rest.

Why: Snakemake decides what to rerun from files, parameters and rule code, not from the densessl package, so
after an edit to a method or an evaluation, results made by the old code stay "up to date" and would sit in
one table beside new ones (it happened in session 6: the LOCA random-init rows kept their old positional
embedding after the fix). DVC stages list their source folders as dependencies and do rerun; for Snakemake
the report is the safety net: every artifact records the commit it was made by (``provenance.git``), and
the report lists the versions and names each artifact made by another commit than the majority, or with
uncommitted changes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

UNKNOWN = "unknown (no git checkout)"


def version_key(provenance: dict[str, Any] | None) -> str:
    """'<commit>' or '<commit> + uncommitted changes'; UNKNOWN where git was not available."""
    git = (provenance or {}).get("git") or {}
    commit = git.get("commit")
    if not commit:
        return UNKNOWN
    return f"{commit[:12]} + uncommitted changes" if git.get("dirty") else commit[:12]


def summarise(artifacts: list[tuple[str, dict[str, Any] | None]]) -> tuple[list[str], list[str]]:
    """(version lines, warning lines) for artifacts given as (label, provenance).

    Version lines: each version with its artifact count, most used first. Warnings: empty when every artifact
    comes from one clean commit; otherwise one line naming the artifacts outside the most used version (up
    to 12, then a count) and one per version with uncommitted changes."""
    keys = [(label, version_key(prov)) for label, prov in artifacts]
    counts = Counter(key for _, key in keys)
    lines = [f"`{key}`: {n} artifact{'s' if n != 1 else ''}" for key, n in counts.most_common()]
    warnings: list[str] = []
    if len(counts) > 1:
        main = counts.most_common(1)[0][0]
        others = [f"{label} ({key})" for label, key in keys if key != main]
        shown = ", ".join(others[:12]) + (f" and {len(others) - 12} more" if len(others) > 12 else "")
        warnings.append(f"{len(others)} of {len(keys)} results were made by other code than the rest (`{main}`): "
                        f"{shown}. Rerun them (`snakemake --forcerun <rule>` or `dvc repro`) before comparing.")
    for key in counts:
        if key.endswith("uncommitted changes"):
            warnings.append(f"{counts[key]} results were made with uncommitted changes on `{key.split()[0]}`; "
                            f"the commit alone does not reproduce them.")
    return lines, warnings
