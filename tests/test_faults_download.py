"""Downloads that stall or are cut short (a loopback HTTP server on 127.0.0.1): one-line error naming the
address and the kept partial file, and the next attempt resumes it with an HTTP Range request."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from densessl.data.download import fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2


class _Handler(BaseHTTPRequestHandler):
    """First request of /stall and /cut sends half the body, then stalls or closes; a Range request gets the rest."""

    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        wanted = self.headers.get("Range")
        self.ranges.append(wanted)
        if wanted:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            self.send_header("Content-Length", str(len(PAYLOAD) - start))
            self.end_headers()
            self.wfile.write(PAYLOAD[start:])
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD[:HALF])
        self.wfile.flush()
        if self.path == "/stall":
            time.sleep(5)  # the client gives up first
        self.close_connection = True

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.ranges = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path", ["/stall", "/cut"])
def test_an_interrupted_transfer_resumes_from_the_kept_bytes(server: str, tmp_path: Path, path: str) -> None:
    """A stall (no data for the timeout) or a connection closed early keeps what arrived in the .part file and
    the retry asks only for the rest with an HTTP Range request (a process killed mid-transfer leaves the same
    .part file for the next run: tests/test_datasets_download.py)."""
    dest = tmp_path / "weights.pth"
    assert fetch(server + path, dest, SHA, timeout=0.5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "weights.pth.part").exists()
    assert _Handler.ranges == [None, f"bytes={HALF}-"]
