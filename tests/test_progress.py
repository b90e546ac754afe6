"""Progress lines: their format, their throttle (on a fake clock), the interval setting and the bar/lines switch."""

from __future__ import annotations

import io
import logging

import pytest

from densessl import progress as progress_mod
from densessl.errors import ConfigError
from densessl.progress import INTERVAL_ENV, Progress, human_bytes, human_duration, progress_interval, track


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="densessl.progress")
    return caplog


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "densessl.progress"]


def test_durations_and_sizes_are_short_and_readable() -> None:
    assert [human_duration(s) for s in (0, 42.4, 392, 3600 * 4 + 21 * 60 + 5, 86400 * 3 + 3600 * 4)] == [
        "0s", "42s", "6m32s", "4h21m", "3d04h"]
    assert human_duration(float("inf")) == "unknown"
    assert [human_bytes(n) for n in (512, 1_500_000, 12_300_000_000)] == ["512 B", "1.5 MB", "12.3 GB"]


def test_a_line_has_step_total_percent_rates_elapsed_eta_and_the_latest_fields(records) -> None:
    clock = FakeClock()
    p = Progress("pretrain dino", 50000, items_per_step=16, interval=30, clock=clock)
    clock.t += 2.0
    p.update(1, epoch=(1, 100), loss=9.1234567, lr=1.25e-4)  # the first step: logged at once
    for _ in range(1199):
        clock.t += 0.3
        p.update(1, epoch=(1, 100), loss=4.1234567, lr=2.5e-4)
    line = p.line()
    # 1199 steps in 359.7 s after the first: 3.33 it/s, 53.3 img/s; 48800 steps left at that rate
    assert line == ("pretrain dino step 1200/50000 (2.4 %) · 3.33 it/s · 53.3 img/s · elapsed 6m02s · "
                    "ETA 4h04m · epoch 1/100 · loss 4.123 · lr 2.500e-04")
    assert "\r" not in line and "\n" not in line
    first = _messages(records)[0]
    assert first.startswith("pretrain dino step 1/50000 (0.0 %) · 0.5 it/s · 8.0 img/s · elapsed 2s · ETA ")
    assert first.endswith("· epoch 1/100 · loss 9.123 · lr 1.250e-04")


def test_lines_come_at_the_first_update_then_every_interval_and_at_the_end(records) -> None:
    clock = FakeClock()
    p = Progress("linear_seg train", 100, interval=30, clock=clock)
    for _ in range(100):
        clock.t += 1.0  # one step a second: lines at steps 1, 31, 61, 91, then the closing one
        p.update(1)
    p.finish()
    steps = [m.split(" (")[0].rsplit(" ", 1)[1] for m in _messages(records)]
    assert steps == ["1/100", "31/100", "61/100", "91/100", "100/100"]
    assert _messages(records)[-1].endswith("· ETA 0s · done in 1m40s")


def test_bytes_show_sizes_and_megabytes_per_second_and_a_resumed_count_starts_its_rate_at_zero(records) -> None:
    clock = FakeClock()
    p = Progress("download train2017.zip", 5_000_000_000, unit="B", initial=1_000_000_000, interval=10,
                 clock=clock)
    clock.t += 1.0
    p.update(10_000_000)
    for _ in range(10):
        clock.t += 1.0
        p.update(12_300_000)
    messages = _messages(records)
    assert messages[0].startswith("download train2017.zip 1.0 GB/5.0 GB (20.2 %) · 10.0 MB/s · elapsed 1s")
    assert messages[1] == ("download train2017.zip 1.1 GB/5.0 GB (22.7 %) · 12.3 MB/s · elapsed 11s · ETA 5m14s")


def test_an_unknown_total_has_no_percent_and_no_eta(records) -> None:
    clock = FakeClock()
    p = Progress("davis2017 propagate", None, unit="frame", interval=0, clock=clock)
    clock.t += 4.0
    p.update(2)
    assert _messages(records) == ["davis2017 propagate frame 2 · 0.5 it/s · elapsed 4s"]


def test_interval_from_the_environment_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_interval() == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert progress_interval() == 5.0 and Progress("x", 1).interval == 5.0
    assert progress_interval(2.0) == 2.0  # a caller's own value wins
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ConfigError, match=f"{INTERVAL_ENV}=.*number >= 0"):
            progress_interval()


def test_inf_and_disabled_log_nothing(records) -> None:
    for p in (Progress("a", 10, interval=float("inf")), Progress("b", 10, interval=0, enabled=False)):
        p.update(10)
        p.finish()
    assert _messages(records) == []


def test_a_bar_on_a_terminal_replaces_the_lines_and_lines_replace_it_elsewhere(records, monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Tty()
    monkeypatch.setattr(progress_mod.sys, "stderr", terminal)
    p = Progress("knn features", 4, bar=True, interval=0)
    p.update(4, loss=1.0)
    p.finish()
    assert _messages(records) == [] and "knn features" in terminal.getvalue()
    monkeypatch.setattr(progress_mod.sys, "stderr", io.StringIO())  # a log file: not a terminal
    p = Progress("knn features", 4, bar=True, interval=0)
    p.update(4)
    p.finish()
    assert len(_messages(records)) == 2


def test_track_counts_items_and_closes_without_a_done_line_when_the_loop_breaks(records) -> None:
    clock = FakeClock()
    batches = [[0] * 8, [0] * 8, [0] * 3]
    for _ in track(batches, "knn train features", unit="batch", items_of=len, interval=0, clock=clock):
        clock.t += 1.0
    messages = _messages(records)
    assert messages[0].startswith("knn train features batch 1/3 (33.3 %) · 1 it/s · 8.0 img/s")
    assert messages[-1].startswith("knn train features batch 3/3 (100.0 %) · 1 it/s · 5.5 img/s")
    assert messages[-1].endswith("done in 3s")
    records.clear()
    for _ in track(batches, "broken", interval=0, clock=clock):
        break
    assert not any("done in" in m for m in _messages(records))


def test_the_cli_refuses_a_bad_interval_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    from densessl.cli import main

    monkeypatch.setenv(INTERVAL_ENV, "soon")
    assert main(["synthesize", "--dataset", "imagenet", "--out", str(tmp_path / "out")]) == 2
    assert f"densessl synthesize: error: {INTERVAL_ENV}='soon'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
