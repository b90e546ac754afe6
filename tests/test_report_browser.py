"""index.html in a real headless browser (Debian's chromium), served over loopback HTTP: no console message,
every table and every plot in the DOM the browser built, and a screenshot kept for a reader.

Console messages: chromium --enable-logging=stderr prints each one as a ``...:INFO:CONSOLE...`` line, whatever
its level (console.error and an uncaught exception are logged at INFO too), so the level cannot be read off
the line. The report has no script, so any console line is a fault: the test allows none. The negative
control shows that a page with an uncaught error is caught.

Chromium: `make test` installs Debian's chromium where it can (root and apt-get); elsewhere these tests skip,
naming the fix, unless DENSESSL_REQUIRE_BROWSER=1 (set by .ci/run where it installs chromium), where a missing
browser fails. Screenshots go to tests/artifacts/report_browser/ (git-ignored), or $DENSESSL_TEST_ARTIFACTS.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import report_project
from conftest import REPO

from densessl.report import plots
from densessl.report.build import build_report

CHROMIUM = shutil.which("chromium")
CONSOLE = re.compile(r"^\[[^\]]*:CONSOLE[^\]]*\] (.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("DENSESSL_REQUIRE_BROWSER") == "1":
            pytest.fail("DENSESSL_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium as root; else apt-get install chromium")
    return CHROMIUM


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A browser that exits before its favicon.ico 404 arrives breaks the pipe: not the page's fault."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1, on a port the OS picks; yields the base URL."""
    server = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def load(chromium: str, url: str, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """(the DOM chromium built, its console messages)."""
    run = subprocess.run([chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                          "--v=0", f"--user-data-dir={profile}", "--no-first-run", *extra, url],
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, CONSOLE.findall(run.stderr)


class Dom(HTMLParser):
    """What the tests look for: tables (with their body rows), figures and the svg and series groups in each."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[int] = []  # rows per table
        self.figures: dict[str, dict[str, object]] = {}
        self._figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append(0)
        elif tag == "tr" and self.tables:
            self.tables[-1] += 1
        elif tag == "figure" and "densessl-plot" in (a.get("class") or ""):
            self._figure = a["id"]
            self.figures[self._figure] = {"svg": 0, "groups": set()}
        elif self._figure is not None and tag == "svg":
            self.figures[self._figure]["svg"] += 1
        elif self._figure is not None and tag == "g" and a.get("id"):
            self.figures[self._figure]["groups"].add(a["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None


def parse(text: str) -> Dom:
    dom = Dom()
    dom.feed(text)
    return dom


def artifacts() -> Path:
    folder = Path(os.environ.get("DENSESSL_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "report_browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_report_renders_every_table_and_plot_with_no_console_message(chromium, tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    cfg = report_project.make(tmp_path)
    build_report(cfg)
    source = parse((cfg.report_dir / "index.html").read_text())
    expected = plots.collect(cfg, [])
    screenshot = artifacts() / "index.png"
    screenshot.unlink(missing_ok=True)
    with serve(cfg.report_dir) as url:
        dom_text, console = load(chromium, f"{url}/index.html", tmp_path / "profile", "--dump-dom")
        _, shot_console = load(chromium, f"{url}/index.html", tmp_path / "profile", f"--screenshot={screenshot}",
                               "--window-size=1280,6000", "--hide-scrollbars")
    assert console == [] and shot_console == []
    dom = parse(dom_text)
    # the tables: as many as the file has, each with its header and every row
    assert len(dom.tables) >= 8 and dom.tables == source.tables
    # the plots: every figure the report's inputs make, each one svg with a group per series
    assert set(dom.figures) == {f.id for f in expected.figures} and len(dom.figures) == 4
    for figure in expected.figures:
        rendered = dom.figures[figure.id]
        assert rendered["svg"] == 1, figure.id
        series = {f"{figure.id}-s{p}-{k}" for p, panel in enumerate(figure.panels) for k in range(len(panel.series))}
        assert series <= rendered["groups"], (figure.id, series - rendered["groups"])
    assert "No row of ours has a published number" in dom_text  # the absent chart's note
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_a_page_with_a_script_error_is_caught(chromium, tmp_path):
    """Negative control: the console check sees an uncaught exception and console.error."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(
        "<!doctype html><html><body><table><tr><td>1</td></tr></table>"
        "<script>console.error('report-broke'); undefinedFunction();</script></body></html>")
    with serve(tmp_path / "site") as url:
        dom_text, console = load(chromium, f"{url}/index.html", tmp_path / "profile", "--dump-dom")
    assert any("report-broke" in line for line in console)
    assert any("Uncaught ReferenceError: undefinedFunction is not defined" in line for line in console)
    assert parse(dom_text).figures == {}  # and a page without the plots has none in its DOM
