"""Released weights on disk: download or find the file, and check it against a pinned or recorded SHA-256.

A ``released:`` entry names its checksum in one of two ways (docs/released.md):

* ``sha256: <64 hex digits>``: pinned in the configuration (a publisher's printed hash, or one you computed);
* ``sha256: record``: the publisher prints none (DINO, LOCA, DenseCL, PixPro, SlotCon), so the first use
  computes it and records it, with the url or path, size, date and user, in the lock file
  (``released_lock``, default ``workflow/released.lock.yaml``, which the user commits); every later use
  verifies the file against that record and refuses a file that differs. This guarantees integrity after the
  first use (the bytes every later run evaluates are the bytes first recorded), not authenticity: nothing
  proves the first download was the publisher's file.

A manually placed file (``path:``, with ``page:`` where the publisher offers only a Google Drive / OneDrive
page) that is missing stops the convert job with one line naming the page, the path and the command.

The lock file is rewritten atomically under an exclusive ``flock`` on ``<lock>.flock``, so concurrent convert
jobs (a cluster runs several at once) each add their entry and none is lost or torn.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from densessl.errors import CheckpointError, DataError
from densessl.io import sha256_file, write_text

RECORD = "record"
DEFAULT_LOCK = "workflow/released.lock.yaml"
LOCK_SCHEMA = "densessl.released-lock/1"
LOCK_HEADER = ("# SHA-256 of released weights whose publishers print none, recorded on first use by the convert stage\n"
               "# (docs/released.md). Commit this file: every later use verifies the file against its entry.\n")


@dataclass(frozen=True)
class Obtained:
    """The release file to import and how its checksum was established (for the sidecar and the report)."""

    path: Path
    sha256: str
    checksum: str            # "pinned" | "recorded on first download" (this run or an earlier one)
    recorded: dict[str, Any] | None = None  # the lock entry, where the checksum is a recorded one

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"checksum": self.checksum}
        if self.recorded is not None:
            out["checksum_record"] = {k: self.recorded.get(k) for k in ("recorded", "by", "size")}
        return out


# ------------------------------------------------------------------------------------------ the lock file


def lock_file(root: Path, configured: str | None) -> Path:
    path = Path(configured or DEFAULT_LOCK).expanduser()
    return path if path.is_absolute() else root / path


def read_lock(path: Path) -> dict[str, dict[str, Any]]:
    """The recorded entries by run id ({} when the file does not exist yet)."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({exc}); restore it from version control") from exc
    releases = data.get("releases") if isinstance(data, dict) else None
    if not isinstance(releases, dict):
        raise CheckpointError(f"{path}: expected a mapping 'releases: {{<run id>: {{sha256, size, ...}}}}'; restore it "
                              f"from version control")
    return releases


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".flock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def record(lock: Path, run_id: str, source: dict[str, str], file: Path, digest: str | None = None) -> dict[str, Any]:
    """Add ``run_id``'s entry (``source``: {url} or {path}, the file's sha256 and size, date, user) to ``lock``.
    An entry another process wrote meanwhile wins: this one then verifies against it instead."""
    digest = digest or sha256_file(file)
    entry = {**source, "sha256": digest, "size": file.stat().st_size,
             "recorded": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "by": _who()}
    with _locked(lock):
        releases = read_lock(lock)
        if run_id in releases:
            return releases[run_id]
        releases[run_id] = entry
        text = yaml.safe_dump({"schema": LOCK_SCHEMA, "releases": dict(sorted(releases.items()))}, sort_keys=False)
        write_text(lock, LOCK_HEADER + text)
    return entry


# ------------------------------------------------------------------------------------------ obtaining a file


def _changed(run_id: str, lock: Path, entry: dict[str, Any], what: str) -> str:
    return (f"released.{run_id}: {what}, but {lock} recorded sha256 {entry['sha256']} ({entry.get('size', '?')} bytes) "
            f"on {entry.get('recorded', '?')} by {entry.get('by', '?')}; the file changed since. If the publisher "
            f"replaced it on purpose, delete that entry from {lock} and rerun to record the new file")


def _check_local(run_id: str, file: Path, expected: str, lock: Path | None, entry: dict[str, Any] | None) -> str:
    """SHA-256 of a file that is not ours to move aside (a manually placed one), refused when it differs."""
    digest = sha256_file(file)
    if digest == expected.lower():
        return digest
    if entry is not None and lock is not None:
        raise CheckpointError(_changed(run_id, lock, entry, f"{file} has sha256 {digest}"))
    raise CheckpointError(f"released.{run_id}: {file} has sha256 {digest}, the configuration pins {expected.lower()}; "
                          f"check the file (or the pinned sha256)")


def missing_file_message(run_id: str, path: Path, page: str | None, preset: str) -> str:
    """One line: where to download the file by hand, where to place it, and the command that records it."""
    where = f"download it by hand from {page}" if page else "download the release"
    return (f"released.{run_id}: {path} is missing: {where}, place it at {path}, then run "
            f"`python -m densessl convert --preset {preset} --run {run_id}` (it records the file's sha256 in the lock "
            f"file on first use; commit that file)")


def obtain(spec: dict[str, Any], run_id: str, download_to: Path | None, lock: Path, preset: str,
           progress: bool = True) -> Obtained:
    """The verified release file of entry ``spec``: downloaded to ``download_to`` (``url``) or found at
    ``path``; with ``sha256: record`` its checksum is recorded in ``lock`` on first use and verified after."""
    from densessl.data.download import download

    pinned = spec.get("sha256")
    policy = "record" if str(pinned).lower() == RECORD else ("pinned" if pinned else None)
    entry = read_lock(lock).get(run_id) if policy == "record" else None
    source = {"url": spec["url"]} if spec.get("url") else {"path": str(spec["path"])}
    if entry is not None and {k: entry.get(k) for k in source} != source:
        theirs = {k: entry.get(k) for k in ("url", "path") if entry.get(k)}
        raise CheckpointError(f"released.{run_id}: {lock} recorded the file of {theirs}, the configuration now names "
                              f"{source}; delete that entry from {lock} to record the new source")
    expected = entry["sha256"] if entry is not None else (pinned if policy == "pinned" else None)
    interval = None if progress else float("inf")

    if spec.get("url"):
        assert download_to is not None, "a url entry needs a download path"
        try:
            file = download(spec["url"], download_to, ("sha256", expected.lower()) if expected else None,
                            size=entry.get("size") if entry else None, cache=False, interval=interval)
        except DataError as exc:
            if entry is None:
                raise
            raise CheckpointError(_changed(run_id, lock, entry, f"the download does not match ({exc})")) from exc
        digest = expected.lower() if expected else sha256_file(file)
    else:
        file = Path(spec["path"]).expanduser()
        if not file.is_file():
            raise CheckpointError(missing_file_message(run_id, file, spec.get("page"), preset))
        digest = _check_local(run_id, file, expected, lock, entry) if expected else sha256_file(file)

    if policy == "pinned":
        return Obtained(file, digest, "pinned")
    if policy is None:  # a local path without a checksum: identified, not verified
        return Obtained(file, digest, "not verified (no sha256 in the configuration)")
    if entry is None:
        entry = record(lock, run_id, source, file, digest)
        if entry["sha256"] != digest:  # another job recorded a different file first
            raise CheckpointError(_changed(run_id, lock, entry, f"{file} has sha256 {digest}"))
    return Obtained(file, digest, "recorded on first download", entry)
