"""HTTP transfer into a partial file that survives interruptions (used by ``densessl.data.download``).

:func:`fetch_to_part` appends to ``<dest>.part``, asking the server with ``Range: bytes=<size>-`` to continue
where an earlier attempt stopped. Every failure keeps the partial file and raises one ``DataError`` naming the
address, the partial file, how many bytes arrived and that a re-run resumes: a server that sends nothing for
``stall_timeout`` seconds (a stalled transfer), a connection closed before ``Content-Length`` bytes (a cut
transfer), an unreachable host. Checksum checks belong to the caller, once the transfer is complete.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from densessl.errors import DataError

CHUNK = 1 << 20


def _expected_total(response: http.client.HTTPResponse, offset: int, resumed: bool) -> int | None:
    length = response.headers.get("Content-Length")
    if length is None:
        return None
    return int(length) + (offset if resumed else 0)


def fetch_to_part(url: str, part: Path, stall_timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` into ``part`` (continuing it when it exists); returns ``part`` once complete."""
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})

    def resume_hint(got: int) -> str:
        return f"re-run to resume from byte {got} (the partial file {part} is kept)"

    try:
        response = urllib.request.urlopen(request, timeout=stall_timeout)  # noqa: S310 (URL from config.yaml)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the partial file is already complete
            return part
        raise DataError(f"{url}: download failed with HTTP {exc.code} {exc.reason}; check the address "
                        f"({resume_hint(offset)})") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{url}: download failed ({reason}); check the address and the network, then "
                        f"{resume_hint(offset)}") from exc
    with response:
        resumed = offset > 0 and response.status == 206
        total = _expected_total(response, offset, resumed)
        got = offset if resumed else 0
        try:
            with open(part, "ab" if resumed else "wb") as f, tqdm(total=total, initial=got, unit="B", unit_scale=True,
                                                                   desc=part.name, disable=not progress) as bar:
                while True:
                    try:
                        block = response.read1(CHUNK)  # what has arrived: a stall keeps it
                    except TimeoutError as exc:
                        raise DataError(f"{url}: the transfer stalled (no data for {stall_timeout:g} s) after "
                                        f"{got} bytes; {resume_hint(got)}") from exc
                    except (http.client.IncompleteRead, ConnectionError) as exc:
                        if isinstance(exc, http.client.IncompleteRead) and exc.partial:
                            f.write(exc.partial)
                            got += len(exc.partial)
                        raise DataError(f"{url}: the connection closed after {got} of {total or '?'} bytes; "
                                        f"{resume_hint(got)}") from exc
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
        finally:
            with open(part, "ab") as f:  # what did arrive is on disk before the next attempt reads its size
                os.fsync(f.fileno())
    if total is not None and got < total:
        raise DataError(f"{url}: the connection closed after {got} of {total} bytes; {resume_hint(got)}")
    return part
