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
from densessl.errors import DataError

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


@pytest.mark.parametrize(("path", "what"), [("/stall", "the transfer stalled (no data for 0.5 s)"),
                                            ("/cut", "the connection closed after")])
def test_interrupted_download_keeps_its_part_and_resumes(server: str, tmp_path: Path, path: str, what: str) -> None:
    dest = tmp_path / "weights.pth"
    part = tmp_path / "weights.pth.part"
    with pytest.raises(DataError) as err:
        fetch(server + path, dest, SHA, timeout=0.5, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{server}{path}: {what}"), message
    assert f"the partial file {part} is kept" in message and "re-run to resume from byte" in message
    assert part.read_bytes() == PAYLOAD[: part.stat().st_size] and part.stat().st_size >= HALF // 2
    kept = part.stat().st_size
    assert fetch(server + path, dest, SHA, timeout=5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert _Handler.ranges == [None, f"bytes={kept}-"]  # the second attempt asked only for the rest
