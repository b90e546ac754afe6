"""Safe extraction of zip and tar archives.

Every member is checked before it is written: an absolute name, a name that leaves the target folder (``../``),
a symbolic or hard link whose target lies outside, and device or FIFO entries are refused with one line naming
the archive and the member. Zip archives and plain tars are checked completely before anything is written (their
member lists are cheap to read); a gzip-compressed tar is a stream, so each member is checked as it arrives, and
tarfile's own ``data`` filter (Python 3.11.4+) runs as a second guard. A truncated or corrupt archive gives a
clear error instead of a traceback. Progress is logged as archive bytes read, rate and ETA.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from densessl.errors import DataError
from densessl.progress import Progress


class _Refused(DataError):
    pass


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check(archive: Path, root: str, name: str, link: str | None = None, hard: bool = False) -> None:
    def refuse(why: str) -> None:
        raise _Refused(f"{archive}: member {name!r} {why}; nothing more is extracted from this archive. Obtain a "
                       f"clean copy (or report it to the dataset's maintainers)")

    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        refuse("has an absolute path")
    dest = os.path.normpath(os.path.join(root, name))
    if not _inside(dest, root):
        refuse("would be written outside the target folder")
    if link is not None:
        if link.startswith(("/", "\\")) or (len(link) > 1 and link[1] == ":"):
            refuse(f"is a link to the absolute path {link!r}")
        base = root if hard else os.path.dirname(dest)
        if not _inside(os.path.normpath(os.path.join(base, link)), root):
            refuse(f"is a link to {link!r}, outside the target folder")


def _zip_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: Path, target: Path, interval: float | None) -> int:
    root = str(target.resolve())
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc}); it is truncated or corrupt: delete it and "
                        f"download it again") from exc
    with zf:
        infos = zf.infolist()
        for info in infos:
            _check(archive, root, info.filename, zf.read(info).decode("utf-8", "replace") if _zip_link(info) else None)
        progress = Progress(f"extract {archive.name}", sum(i.compress_size for i in infos), unit="B",
                            interval=interval)
        count = 0
        for info in infos:
            try:
                if _zip_link(info):
                    dest = Path(root) / info.filename
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.unlink(missing_ok=True)
                    os.symlink(zf.read(info).decode("utf-8"), dest)
                else:
                    zf.extract(info, root)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise DataError(f"{archive}: member {info.filename!r} cannot be read ({exc}); the archive is "
                                f"truncated or corrupt: delete it and download it again") from exc
            count += not info.is_dir()
            progress.update(info.compress_size)
        progress.finish()
    return count


def _check_tar_member(archive: Path, root: str, m: tarfile.TarInfo) -> None:
    if m.isdev() or m.isfifo():
        _check(archive, root, m.name)
        raise _Refused(f"{archive}: member {m.name!r} is a device or FIFO entry; nothing more is extracted from this "
                       f"archive. Obtain a clean copy")
    _check(archive, root, m.name, m.linkname if (m.issym() or m.islnk()) else None, hard=m.islnk())


def _extract_tar(archive: Path, target: Path, compressed: bool, interval: float | None) -> int:
    root = str(target.resolve())
    size = archive.stat().st_size
    count = 0
    try:
        with open(archive, "rb") as raw:
            progress = Progress(f"extract {archive.name}", size, unit="B", interval=interval)
            if compressed:
                tf = tarfile.open(fileobj=raw, mode="r|gz")
                members = tf
            else:
                tf = tarfile.open(fileobj=raw, mode="r:")
                members = tf.getmembers()
                for m in members:
                    _check_tar_member(archive, root, m)
            last = 0
            with tf:
                for m in members:
                    if compressed:
                        _check_tar_member(archive, root, m)
                    tf.extract(m, root, set_attrs=False, filter="data")
                    count += m.isfile()
                    pos = raw.tell()
                    progress.update(max(pos - last, 0))
                    last = pos
            progress.finish()
    except _Refused:
        raise
    except tarfile.FilterError as exc:
        raise DataError(f"{archive}: {exc}; nothing more is extracted from this archive. Obtain a clean copy") from exc
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{archive}: cannot be read to the end ({exc.__class__.__name__}: {exc}); the archive is "
                        f"truncated or corrupt: delete it and download it again") from exc
    return count


def extract(archive: str | os.PathLike[str], target: str | os.PathLike[str], fmt: str,
            interval: float | None = None) -> int:
    """Extract ``archive`` (``zip`` | ``tar`` | ``tar.gz``) into ``target``; return the number of files written."""
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        return _extract_zip(archive, target, interval)
    if fmt in ("tar", "tar.gz"):
        return _extract_tar(archive, target, fmt == "tar.gz", interval)
    raise DataError(f"{archive}: archive format {fmt!r} unknown; expected zip, tar or tar.gz")


def member_names(archive: Path, fmt: str) -> list[str]:
    """Names in an archive (for messages and tests)."""
    if fmt == "zip":
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with tarfile.open(archive, "r:*") as tf:
        return [posixpath.normpath(m.name) for m in tf.getmembers()]
