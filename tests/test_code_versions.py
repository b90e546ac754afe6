"""The report names results made by other code than the rest."""

from __future__ import annotations

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
    assert warnings == ["1 results were made with uncommitted changes on `aaaaaaaaaaaa`; the commit alone does "
                        "not reproduce them."]


def test_long_lists_are_cut_with_a_count():
    arts = [(f"evaluate run{i}", B) for i in range(15)] + [(f"pretrain m{i}", A) for i in range(20)]
    _, warnings = summarise(arts)
    assert "and 3 more" in warnings[0] and warnings[0].startswith("15 of 35 results")
