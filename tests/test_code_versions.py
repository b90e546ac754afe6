"""The report names results made by other code than the rest."""

from __future__ import annotations

from pathlib import Path

from densessl.provenance import code_fingerprint
from densessl.report.code_versions import UNKNOWN, summarise, version_key

A = {"git": {"commit": "a" * 40, "dirty": False}}
B = {"git": {"commit": "b" * 40, "dirty": False}}
A_DIRTY = {"git": {"commit": "a" * 40, "dirty": True}}


def test_one_clean_commit_gives_no_warning():
    lines, warnings = summarise([("evaluate x", A), ("pretrain y", A)])
    assert lines == ["`aaaaaaaaaaaa`: 2 artifacts"] and warnings == []


def test_the_odd_result_is_named_with_its_version():
    lines, warnings = summarise([("evaluate x", A), ("pretrain y", A), ("convert random-init/z", B)])
    assert lines == ["`aaaaaaaaaaaa`: 2 artifacts", "`bbbbbbbbbbbb`: 1 artifact"]
    assert len(warnings) == 1
    assert warnings[0].startswith("1 of 3 results were made by other code than the rest (`aaaaaaaaaaaa`)")
    assert "convert random-init/z (bbbbbbbbbbbb)" in warnings[0] and "evaluate x" not in warnings[0]


def test_uncommitted_changes_and_missing_git_are_visible():
    assert version_key(A_DIRTY) == "aaaaaaaaaaaa + uncommitted changes"
    assert version_key({"git": {"commit": None, "dirty": None}}) == UNKNOWN and version_key(None) == UNKNOWN
    _, warnings = summarise([("evaluate x", A_DIRTY)])
    assert warnings == ["1 results were made with uncommitted changes (`aaaaaaaaaaaa + uncommitted changes`, on "
                        "aaaaaaaaaaaa); no commit reproduces them."]


def test_long_lists_are_cut_with_a_count():
    arts = [(f"evaluate run{i}", B) for i in range(15)] + [(f"pretrain m{i}", A) for i in range(20)]
    _, warnings = summarise(arts)
    assert "and 3 more" in warnings[0] and warnings[0].startswith("15 of 35 results")


def _with_code(commit: str, sha: str, uncommitted: bool = False) -> dict:
    return {"git": {"commit": commit * 40, "dirty": uncommitted}, "code": {"sha256": sha * 64, "uncommitted": uncommitted}}


def test_results_are_grouped_by_source_fingerprint_not_commit():
    # a commit that touched only the README: same source, other commit → one version, no warning
    lines, warnings = summarise([("evaluate x", _with_code("a", "1")), ("pretrain y", _with_code("b", "1"))])
    assert lines == ["`code 111111111111`: 2 artifacts (commits aaaaaaaaaaaa, bbbbbbbbbbbb)"] and warnings == []
    # a source edit: same commit, other fingerprint → named
    _, warnings = summarise([("evaluate x", _with_code("a", "1")), ("pretrain y", _with_code("a", "1")),
                             ("convert z", _with_code("a", "2", uncommitted=True))])
    assert "convert z (code 222222222222 + uncommitted changes)" in warnings[0]
    assert warnings[1] == ("1 results were made with uncommitted changes (`code 222222222222 + uncommitted "
                           "changes`, on aaaaaaaaaaaa); no commit reproduces them.")
    # an artifact from before fingerprints falls back to its commit and is told apart
    _, warnings = summarise([("evaluate x", _with_code("a", "1")), ("evaluate old", A), ("pretrain y", _with_code("a", "1"))])
    assert "evaluate old (aaaaaaaaaaaa)" in warnings[0]


def test_code_fingerprint_follows_source_bytes_only(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "t.yaml").write_text("k: 1\n")
    first = code_fingerprint.__wrapped__(pkg)
    assert first["files"] == 2 and first["uncommitted"] is None  # not a git checkout
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (pkg / "notes.txt").write_text("not source")
    assert code_fingerprint.__wrapped__(pkg)["sha256"] == first["sha256"]
    (pkg / "a.py").write_text("x = 2\n")
    assert code_fingerprint.__wrapped__(pkg)["sha256"] != first["sha256"]
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "a.py").rename(pkg / "b.py")  # same bytes under another name is other code
    assert code_fingerprint.__wrapped__(pkg)["sha256"] != first["sha256"]
