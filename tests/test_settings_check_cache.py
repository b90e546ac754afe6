"""The settings check's cache: a passed check is skipped for the same configuration and code, repeated when
either changes, and never hides an error or fails because the results folder cannot be written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densessl import settings_check
from densessl.config import load_config
from densessl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, text: str = ""):  # noqa: ANN202
    path = tmp_path / "config.yaml"
    path.write_text("preset: smoke\n" + text, encoding="utf-8")
    return load_config([path], root=REPO, check_settings=False)


def test_a_passed_check_is_remembered_per_configuration(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert settings_check.check_stage_settings_cached(cfg, tmp_path) is True
    cache = json.loads((tmp_path / settings_check.CACHE_NAME).read_text())
    assert cache["passed"] == [settings_check.check_key(cfg)]
    assert settings_check.check_stage_settings_cached(cfg, tmp_path) is False
    other = _cfg(tmp_path, "evaluate:\n  patchseg:\n    epochs: 3\n")
    assert settings_check.check_key(other) != settings_check.check_key(cfg)
    assert settings_check.check_stage_settings_cached(other, tmp_path) is True
    # both variants are kept: switching back does not check again
    assert settings_check.check_stage_settings_cached(cfg, tmp_path) is False


def test_a_bad_setting_fails_even_with_a_cache(tmp_path: Path) -> None:
    settings_check.check_stage_settings_cached(_cfg(tmp_path), tmp_path)
    bad = _cfg(tmp_path, "evaluate:\n  linear_seg:\n    iteration: 10\n")
    with pytest.raises(ConfigError, match=r"evaluate.linear_seg: unknown field\(s\) \['iteration'\]"):
        settings_check.check_stage_settings_cached(bad, tmp_path)
    assert len(json.loads((tmp_path / settings_check.CACHE_NAME).read_text())["passed"]) == 1


def test_a_source_change_checks_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    settings_check.check_stage_settings_cached(cfg, tmp_path)
    monkeypatch.setattr(settings_check, "source_digest", lambda: "edited")
    assert settings_check.check_stage_settings_cached(cfg, tmp_path) is True


def test_source_digest_follows_the_package_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    before = settings_check.source_digest(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert settings_check.source_digest(tmp_path) != before


def test_an_unwritable_results_folder_only_costs_the_check(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where the results folder should be")
    assert settings_check.check_stage_settings_cached(cfg, not_a_folder) is True
    assert settings_check.check_stage_settings_cached(cfg, not_a_folder) is True


def test_a_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / settings_check.CACHE_NAME).write_text("{not json")
    assert settings_check.check_stage_settings_cached(_cfg(tmp_path), tmp_path) is True
