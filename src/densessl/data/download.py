"""Resumable, checksummed downloads (released checkpoints, dataset archives).

A download goes to ``<dest>.part`` and is renamed only after its SHA-256 matches, so an interrupted or corrupt
transfer never looks like a finished file; a rerun continues the ``.part`` file with an HTTP Range request
where the server supports it (and starts over where it does not).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from densessl.errors import DataError

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str | Path, sha256: str, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the file with checksum ``sha256``."""
    dest = Path(dest)
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise DataError(f"{url}: sha256 {sha256!r} is not a 64-digit hex SHA-256; copy it from the release page "
                        f"or compute it with `sha256sum` on a trusted copy")
    if dest.is_file():
        if sha256_of(dest) == sha256:
            return dest
        raise DataError(f"{dest}: exists but its SHA-256 is not {sha256}; delete it to download again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (URL comes from config.yaml)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the .part file is already complete
            response = None
        else:
            raise DataError(f"{url}: download failed with HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DataError(f"{url}: download failed ({exc}); check the address and the network, then rerun "
                        f"(the transfer resumes from {part})") from exc
    if response is not None:
        with response:
            resumed = offset > 0 and response.status == 206
            mode = "ab" if resumed else "wb"
            total = response.headers.get("Content-Length")
            total_bytes = (int(total) + (offset if resumed else 0)) if total else None
            with open(part, mode) as f, tqdm(total=total_bytes, initial=offset if resumed else 0, unit="B",
                                             unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := response.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
    actual = sha256_of(part)
    if actual != sha256:
        part.unlink()
        raise DataError(f"{url}: SHA-256 of the download is {actual}, expected {sha256}; the partial file was "
                        f"removed. Check the checksum in config.yaml or the address")
    os.replace(part, dest)
    return dest
