"""Resumable, checksummed downloads (released checkpoints, dataset archives).

A download goes to ``<dest>.part`` and is renamed only after its SHA-256 matches, so an interrupted or corrupt
transfer never looks like a finished file; a rerun continues the ``.part`` file with an HTTP Range request
where the server supports it (and starts over where it does not).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from densessl.errors import DataError
from densessl.net import fetch_to_part

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str | Path, sha256: str, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the file with checksum ``sha256``; ``timeout``
    is how long a stalled transfer may send nothing before it fails (its partial file kept, see ``densessl.net``)."""
    dest = Path(dest)
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise DataError(f"{url}: sha256 {sha256!r} is not a 64-digit hex SHA-256; copy it from the release page "
                        f"or compute it with `sha256sum` on a trusted copy")
    if dest.is_file():
        if sha256_of(dest) == sha256:
            return dest
        raise DataError(f"{dest}: exists but its SHA-256 is not {sha256}; delete it to download again")
    part = fetch_to_part(url, dest.with_name(dest.name + ".part"), stall_timeout=timeout, progress=progress)
    actual = sha256_of(part)
    if actual != sha256:
        part.unlink()
        raise DataError(f"{url}: SHA-256 of the download is {actual} (complete), expected {sha256}; the file was "
                        f"removed. Check the checksum in config.yaml or the address")
    os.replace(part, dest)
    return dest
