"""Which code produced each number: the report flags results made by other code than the rest.

Why: Snakemake decides what to rerun from files, parameters and rule code, not from the densessl package, so
after an edit to a method or an evaluation, results made by the old code stay "up to date" and would sit in
one table beside new ones (e.g. random-init rows made before a change to a method's initialisation). DVC
stages list their source folders as dependencies and do rerun; for Snakemake
the report is the safety net: every artifact records a fingerprint of the package source it ran
(``provenance.code``) and the commit of the checkout (``provenance.git``). Results are grouped by the
fingerprint, so commits that touch only documentation or tests do not split them; artifacts recorded before
the fingerprint existed fall back to the commit.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

UNKNOWN = "unknown (no git checkout)"
UNCOMMITTED = " + uncommitted changes"


def version_key(provenance: dict[str, Any] | None) -> str:
    """'code <sha256[:12]>' (source fingerprint) or, for older artifacts, '<commit[:12]>'; either followed by
    ' + uncommitted changes' when the source differed from the commit; UNKNOWN when neither is known."""
    prov = provenance or {}
    code = prov.get("code") or {}
    if code.get("sha256"):
        return f"code {code['sha256'][:12]}" + (UNCOMMITTED if code.get("uncommitted") else "")
    git = prov.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return UNKNOWN
    return commit[:12] + (UNCOMMITTED if git.get("dirty") else "")


def _commit(provenance: dict[str, Any] | None) -> str | None:
    commit = ((provenance or {}).get("git") or {}).get("commit")
    return commit[:12] if commit else None


def summarise(artifacts: list[tuple[str, dict[str, Any] | None]]) -> tuple[list[str], list[str]]:
    """(version lines, warning lines) for artifacts given as (label, provenance).

    Version lines: each version with its artifact count (and, for fingerprints, the commits they ran at), most
    used first. Warnings: empty when every artifact comes from one committed version; otherwise one line
    naming the artifacts outside the most used version (up to 12, then a count) and one per version with
    uncommitted changes."""
    keys = [(label, version_key(prov)) for label, prov in artifacts]
    counts = Counter(key for _, key in keys)
    commits: dict[str, set[str]] = defaultdict(set)
    for (_, key), (_, prov) in zip(keys, artifacts):
        commit = _commit(prov)
        if key.startswith("code ") and commit:
            commits[key].add(commit)
    lines = []
    for key, n in counts.most_common():
        seen = sorted(commits[key])
        where = f" (commit{'s' if len(seen) > 1 else ''} {', '.join(seen)})" if seen else ""
        lines.append(f"`{key}`: {n} artifact{'s' if n != 1 else ''}{where}")
    warnings: list[str] = []
    if len(counts) > 1:
        main = counts.most_common(1)[0][0]
        others = [f"{label} ({key})" for label, key in keys if key != main]
        shown = ", ".join(others[:12]) + (f" and {len(others) - 12} more" if len(others) > 12 else "")
        warnings.append(f"{len(others)} of {len(keys)} results were made by other code than the rest (`{main}`): "
                        f"{shown}. Rerun them (`snakemake --forcerun <rule>` or `dvc repro`) before comparing.")
    for key in counts:
        if key.endswith(UNCOMMITTED):
            at = ", ".join(sorted(commits[key])) or key.split()[0]
            warnings.append(f"{counts[key]} results were made with uncommitted changes (`{key}`, on {at}); "
                            f"no commit reproduces them.")
    return lines, warnings
