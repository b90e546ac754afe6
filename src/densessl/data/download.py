"""Resumable, checksummed HTTP downloads (dataset archives, released checkpoints).

A transfer goes to ``<dest>.part`` and becomes ``<dest>`` only after its size and checksum match, so an
interrupted or corrupt transfer never looks like a finished file. A cut connection, a timeout or a 5xx/429
answer is retried with exponential back-off, each retry continuing the ``.part`` file with an HTTP Range
request (and starting over where the server ignores Range); a rerun after the process died continues the same
way. A file whose checksum does not match is moved aside to ``<dest>.bad-<digest prefix>`` (kept for
inspection, never read) and the error names the file, the expected and the actual hash.

API (used by the data preparation and the convert stage):

* ``download(url, dest, checksum=("sha256"|"md5", hex) | None, size=None, ...) -> Path``
* ``verify_file(path, checksum, size, source="", cache=True) -> str | None`` (the digest; moves aside on mismatch)
* ``fetch(url, dest, sha256, ...) -> Path``: ``download`` with a mandatory SHA-256 (released checkpoints)
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from densessl.errors import DataError
from densessl.progress import Progress

CHUNK = 1 << 20
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
ALGORITHM_NAMES = {"sha256": "SHA-256", "md5": "MD5"}
VERIFIED_SUFFIX = ".densessl-verified.json"

log = logging.getLogger("densessl.data")


def _open(request: urllib.request.Request, timeout: float):  # noqa: ANN202 (an http.client response)
    """One HTTP request; a seam the tests use to prove no request leaves the loopback interface."""
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (addresses come from the catalog/config)


def file_digest(path: Path, algorithm: str = "sha256", what: str | None = None, interval: float | None = None) -> str:
    digest = hashlib.new(algorithm)
    progress = Progress(what or f"{ALGORITHM_NAMES.get(algorithm, algorithm)} of {path.name}",
                        path.stat().st_size, unit="B", interval=interval)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            progress.update(len(block))
    progress.finish()
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return file_digest(Path(path), "sha256")


def _check_hex(checksum: tuple[str, str] | None, where: str) -> None:
    if checksum is None:
        return
    algorithm, value = checksum
    lengths = {"sha256": 64, "md5": 32}
    if algorithm not in lengths:
        raise DataError(f"{where}: checksum algorithm {algorithm!r} unknown; use sha256 or md5")
    if len(value) != lengths[algorithm] or any(c not in "0123456789abcdef" for c in value.lower()):
        raise DataError(f"{where}: {algorithm} {value!r} is not a {lengths[algorithm]}-digit hex digest; copy it "
                        f"from the release page or compute it with `{algorithm}sum` on a trusted copy")


def _set_aside(path: Path, actual: str) -> Path:
    bad = path.with_name(f"{path.name.removesuffix('.part')}.bad-{actual[:12]}")
    os.replace(path, bad)
    return bad


def verify_file(path: Path, checksum: tuple[str, str] | None, size: int | None, source: str = "",
                cache: bool = True, label: str | None = None, interval: float | None = None) -> str | None:
    """Check ``path``'s size and checksum; return the digest (None where no checksum is published).

    A mismatching file is moved aside and a DataError names it with the expected and actual values. With
    ``cache`` a verified file gets a ``<name>.densessl-verified.json`` sidecar (size, mtime, digest) so a rerun
    does not hash 150 GB again; any change of size or mtime invalidates it."""
    path = Path(path)
    label = label or str(path)
    stat = path.stat()
    where = f" (catalog: {source})" if source else ""
    if size is not None and stat.st_size != size:  # a wrong size is a wrong file, whatever its hash
        hashes = ""
        if checksum is not None:
            actual = file_digest(path, checksum[0], interval=interval)
            hashes = f"; {ALGORITHM_NAMES.get(checksum[0], checksum[0])} is {actual}, expected {checksum[1].lower()}"
        path.with_name(path.name + VERIFIED_SUFFIX).unlink(missing_ok=True)
        bad = _set_aside(path, f"size{stat.st_size}")
        raise DataError(f"{label}: size is {stat.st_size:,} bytes, expected {size:,}{hashes}{where}; the file was "
                        f"moved aside to {bad} (not used). Check the address or --mirror, then rerun to fetch it again")
    if checksum is None:
        return None
    algorithm, expected = checksum[0], checksum[1].lower()
    sidecar = path.with_name(path.name + VERIFIED_SUFFIX)
    if cache and sidecar.is_file():
        try:
            seen = json.loads(sidecar.read_text(encoding="utf-8"))
            if (seen.get("size"), seen.get("mtime_ns"), seen.get("algorithm"), seen.get("digest")) == (
                    stat.st_size, stat.st_mtime_ns, algorithm, expected):
                return expected
        except (OSError, json.JSONDecodeError):
            pass
    actual = file_digest(path, algorithm, interval=interval)
    if actual != expected:
        sidecar.unlink(missing_ok=True)
        bad = _set_aside(path, actual)
        name = ALGORITHM_NAMES.get(algorithm, algorithm)
        raise DataError(f"{label}: {name} of the download is {actual}, expected {expected}{where}; the file was "
                        f"moved aside to {bad} (not used). Check the address or --mirror, then rerun to fetch it "
                        f"again")
    if cache:
        _write_sidecar(path, algorithm, actual)
    return actual


def identify(path: Path, interval: float | None = None) -> str:
    """SHA-256 of a file that has no published checksum (cached like a verified one), so the data manifest still
    records the identity of exactly the bytes that were prepared."""
    path = Path(path)
    sidecar = path.with_name(path.name + VERIFIED_SUFFIX)
    stat = path.stat()
    if sidecar.is_file():
        try:
            seen = json.loads(sidecar.read_text(encoding="utf-8"))
            if (seen.get("size"), seen.get("mtime_ns"), seen.get("algorithm")) == (stat.st_size, stat.st_mtime_ns,
                                                                                   "sha256"):
                return str(seen["digest"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    digest = file_digest(path, "sha256", interval=interval)
    _write_sidecar(path, "sha256", digest)
    return digest


def _write_sidecar(path: Path, algorithm: str, digest: str) -> None:
    stat = path.stat()
    path.with_name(path.name + VERIFIED_SUFFIX).write_text(
        json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "algorithm": algorithm, "digest": digest})
        + "\n", encoding="utf-8")


def _transfer(url: str, part: Path, timeout: float, interval: float | None, label: str) -> bool:
    """One HTTP request continuing ``part``. True when the server says the file is complete; raises
    ``_Retryable`` for faults worth another try and DataError for the rest."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = _open(request, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the .part file already holds everything
            return True
        if exc.code in RETRYABLE_HTTP:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
        raise DataError(f"{url}: download failed with HTTP {exc.code} {exc.reason}; check the address "
                        f"(or --mirror), then rerun") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        raise _Retryable(str(getattr(exc, "reason", exc))) from exc
    with response:
        resumed = offset > 0 and response.status == 206
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        start = offset if resumed else 0
        total = start + length if length is not None else None
        if offset and not resumed:
            log.info(f"{label}: the server ignored the Range request; starting over")
        progress = Progress(f"download {label}", total, unit="B", initial=start, interval=interval)
        got = 0
        try:
            with open(part, "ab" if resumed else "wb") as f:
                # read1: whatever has arrived (up to CHUNK); read(CHUNK) would drop the bytes of a block that
                # times out half-way, so a stalled transfer would keep nothing to resume from
                while block := response.read1(CHUNK):
                    f.write(block)
                    got += len(block)
                    progress.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        except (http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
            raise _Retryable(f"connection lost after {start + got:,} bytes ({exc.__class__.__name__})") from exc
        if length is not None and got < length:
            raise _Retryable(f"connection closed after {start + got:,} of {total:,} bytes")
        progress.finish()
    return True


class _Retryable(Exception):
    """A fault worth another try (lost connection, timeout, HTTP 408/425/429/5xx)."""


def download(url: str, dest: str | os.PathLike[str], checksum: tuple[str, str] | None = None,
             size: int | None = None, source: str = "", retries: int = 5, backoff: float = 2.0,
             timeout: float = 60.0, interval: float | None = None, cache: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the verified file; return ``dest``.

    Faults are retried up to ``retries`` times in a row (a try that received bytes resets the count), waiting
    ``backoff * 2**k`` seconds; each try resumes the ``.part`` file."""
    dest = Path(dest)
    _check_hex(checksum, url)
    if dest.is_file():
        verify_file(dest, checksum, size, source, cache=cache, interval=interval)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.is_file() else 0
        try:
            _transfer(url, part, timeout, interval, dest.name)
            break
        except _Retryable as exc:
            # a try that grew the .part file resets the count (a server that ignores Range and cuts the
            # connection every time never does, so it cannot loop forever)
            grew = part.is_file() and part.stat().st_size > before
            failures = 0 if grew else failures + 1
            if failures > retries:
                raise DataError(f"{url}: download failed after {retries} retries ({exc}); check the address and the "
                                f"network, then rerun (the transfer resumes from {part})") from exc
            wait = backoff * 2 ** max(failures - 1, 0)
            log.warning(f"download {dest.name}: {exc}; retrying in {wait:.1f}s")
            time.sleep(wait)
    digest = verify_file(part, checksum, size, source, cache=False, label=str(dest), interval=interval)
    os.replace(part, dest)
    if cache and checksum is not None and digest is not None:
        _write_sidecar(dest, checksum[0], digest)  # a rename keeps the mtime: the next run need not hash again
    return dest


def fetch(url: str, dest: str | Path, sha256: str, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the file with checksum ``sha256``."""
    return download(url, dest, ("sha256", sha256.lower()), timeout=timeout, cache=False,
                    interval=None if progress else float("inf"))
