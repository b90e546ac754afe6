"""Get one dataset into a root folder: download (or find the manually placed files), verify, extract, prepare,
count, then write the completion marker.

Steps and their records under ``<root>``:

1. files: ``.densessl-downloads/<file>`` (downloaded, or placed there by hand for a manual dataset; a file
   placed directly in ``<root>`` is found too). Verified by size and checksum before anything reads it
   (``download.verify_file``); the verified digest is cached next to the file.
2. extraction: ``.densessl-state/extracted-<file>.json`` after an archive is fully extracted.
3. preparation (``prepare.PREPARERS``): ``.densessl-state/prepared.json``.
4. counts: every ``CountSpec`` of the catalog must match; a mismatch stops here with the counts found.
5. ``.densessl-dataset.json``, written last (atomically): the files with their verified checksums, the counts.

A step whose record exists is not repeated, so a rerun continues where an interrupted one stopped, and a folder
without the final marker never looks finished. Nothing downstream (extraction, preparation) runs on a file that
failed its checksum: the error is raised before.
"""

from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path
from typing import Any

from densessl.data.catalog import DatasetSpec, FileSpec, dataset_spec, load_catalog
from densessl.data.download import VERIFIED_SUFFIX, download, identify, verify_file
from densessl.data.extract import extract
from densessl.data.prepare import PREPARERS, link_coco_images
from densessl.errors import DataError
from densessl.io import read_json, write_json
from densessl.progress import human_bytes

MARKER = ".densessl-dataset.json"
STATE = ".densessl-state"
DOWNLOADS = ".densessl-downloads"

log = logging.getLogger("densessl.data")


def verify_command(name: str, root: Path) -> str:
    return f"python -m densessl download --dataset {name} --root {root}"


def _located(spec: FileSpec, root: Path, downloads: Path) -> Path | None:
    for candidate in (downloads / spec.name, root / spec.name):
        if candidate.is_file():
            return candidate
    return None


def manual_message(ds: DatasetSpec, root: Path, downloads: Path, missing: list[FileSpec]) -> str:
    lines = [f"{ds.title} must be downloaded by hand ({ds.how or ds.homepage}). Missing under {downloads}:"]
    for f in missing:
        size = f"{f.size:,} bytes" if f.size else "size not published"
        check = f"{f.checksum[0]} {f.checksum[1]}" if f.checksum else "no published checksum"
        lines.append(f"  {downloads / f.name}  ({size}; {check})")
    lines.append(f"Place the files there (or in {root}), then run: {verify_command(ds.name, root)}")
    return "\n".join(lines)


def _count(root: Path, c: Any) -> int:
    if c.kind == "glob":
        return len(glob.glob(str(root / c.pattern)))
    if c.kind == "dirs":
        return sum(1 for p in glob.glob(str(root / c.pattern)) if Path(p).is_dir())
    path = root / c.path
    if not path.is_file():
        return 0
    if c.kind == "lines":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if c.kind == "json":
        return len(json.loads(path.read_text(encoding="utf-8")).get(c.key, []))
    raise DataError(f"catalog count {c.split!r}: kind {c.kind!r} unknown; use glob, dirs, lines or json")


def check_counts(ds: DatasetSpec, root: Path) -> dict[str, int]:
    found = {c.split: _count(root, c) for c in ds.counts}
    wrong = [c for c in ds.counts if found[c.split] != c.expected]
    if wrong:
        detail = "; ".join(f"{c.split}: {found[c.split]:,} (expected {c.expected:,}, "
                           f"{c.pattern or c.path}{', ' + c.source if c.source else ''})" for c in wrong)
        raise DataError(f"{root}: {ds.name} prepared with the wrong counts: {detail}. An archive is incomplete or "
                        f"from another release; the dataset is not marked complete (delete {root / STATE} and rerun "
                        f"{verify_command(ds.name, root)!r} to extract again)")
    return found


def ensure_dataset(name: str, root: str | Path, mirror: str | None = None, catalog: dict[str, DatasetSpec] | None = None,
                   downloads: str | Path | None = None, retries: int = 5, backoff: float = 2.0,
                   interval: float | None = None, coco_root: str | Path | None = None) -> dict[str, Any]:
    """Bring dataset ``name`` to its prepared, verified layout under ``root``; return the completion marker.

    ``coco_root`` (LVIS only): a prepared COCO root whose images the LVIS root links to."""
    ds = dataset_spec(name, catalog if catalog is not None else load_catalog())
    root = Path(root).expanduser().resolve()
    marker_path = root / MARKER
    if marker_path.is_file():
        marker = read_json(marker_path)
        log.info(f"{name}: {root} is complete (marker {marker_path})")
        if name == "lvis" and coco_root is not None:  # links may be asked for after the fact (idempotent)
            link_coco_images(root, Path(coco_root).expanduser().resolve())
        return marker
    downloads = Path(downloads).resolve() if downloads else root / DOWNLOADS
    started = time.time()

    located = {f.name: _located(f, root, downloads) for f in ds.files}
    missing = [f for f in ds.files if located[f.name] is None]
    # an already extracted copy without its archives (common on clusters): counted, not re-downloaded
    prepared_by_hand = len(missing) == len(ds.files) and bool(ds.counts) and _layout_present(ds, root)
    if prepared_by_hand:
        log.info(f"{name}: no archives under {downloads} but {root} holds the prepared layout; checking counts")
    elif ds.manual and missing:
        raise DataError(manual_message(ds, root, downloads, missing))
    state = root / STATE
    state.mkdir(parents=True, exist_ok=True)

    files: list[dict[str, Any]] = []
    if not prepared_by_hand:
        for f in ds.files:
            path = located[f.name]
            if path is None:
                url = f.url_for(mirror)
                log.info(f"{name}: downloading {f.name} ({human_bytes(f.size) if f.size else 'size not published'}) "
                         f"from {url}")
                path = download(url, downloads / f.name, f.checksum, f.size, f.source, retries=retries,
                                backoff=backoff, interval=interval)
            else:
                log.info(f"{name}: verifying {path}")
            digest = verify_file(path, f.checksum, f.size, f.source, interval=interval)
            if digest is None:  # nothing published to check against: record what was used
                digest = identify(path, interval=interval)
            files.append({"name": f.name, "url": f.url, "size": path.stat().st_size,
                          "algorithm": f.checksum[0] if f.checksum else "sha256", "digest": digest,
                          "published_checksum": f.checksum is not None, "source": f.source})
        for f, rec in zip(ds.files, files, strict=True):
            done = state / f"extracted-{f.name}.json"
            if done.is_file():
                continue
            path = _located(f, root, downloads)
            assert path is not None
            log.info(f"{name}: extracting {f.name} into {root / f.extract_to}")
            n = extract(path, root / f.extract_to, f.format, interval=interval)
            write_json(done, {"file": f.name, "digest": rec["digest"], "files_written": n})
        prep_done = state / "prepared.json"
        if not prep_done.is_file():
            log.info(f"{name}: preparing ({ds.prepare})")
            write_json(prep_done, {"prepare": ds.prepare, "result": PREPARERS[ds.prepare](root, interval=interval)})
    if name == "lvis" and coco_root is not None:
        link_coco_images(root, Path(coco_root).expanduser().resolve())

    counts = check_counts(ds, root)
    marker = {"dataset": name, "title": ds.title, "root": str(root), "files": files,
              "archives_verified": not prepared_by_hand, "counts": counts, "prepare": ds.prepare,
              "seconds": round(time.time() - started, 1)}
    write_json(marker_path, marker)  # last: its presence means every step above finished
    log.info(f"{name}: complete; counts {counts}")
    return marker


def _layout_present(ds: DatasetSpec, root: Path) -> bool:
    return bool(ds.layout) and all((root / rel).is_dir() for rel in ds.layout)


def read_marker(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MARKER
    return read_json(path) if path.is_file() else None


def status(catalog: dict[str, DatasetSpec], roots: dict[str, str | None]) -> list[dict[str, Any]]:
    """Every dataset with its files and, under its configured root, what is present and verified."""
    out = []
    for name, ds in catalog.items():
        root = Path(roots[name]).expanduser() if roots.get(name) else None
        downloads = root / DOWNLOADS if root else None
        marker = read_marker(root) if root and root.is_dir() else None
        files = []
        for f in ds.files:
            entry: dict[str, Any] = {"name": f.name, "url": f.url, "size": f.size, "source": f.source}
            if f.sha256:
                entry["sha256"] = f.sha256
            if f.md5:
                entry["md5"] = f.md5
            path = _located(f, root, downloads) if root and downloads else None
            entry["present"] = path is not None
            # verified = checked against the published checksum (a file without one is only ever "present")
            entry["verified"] = f.checksum is not None and (bool(path and _sidecar_valid(path, f.checksum)) or bool(
                marker and any(r["name"] == f.name and r["published_checksum"] for r in marker.get("files", []))))
            files.append(entry)
        out.append({"name": name, "title": ds.title, "manual": ds.manual, "homepage": ds.homepage,
                    "root": str(root) if root else None, "prepared": marker is not None,
                    "counts": {c.split: c.expected for c in ds.counts}, "files": files})
    return out


def _sidecar_valid(path: Path, checksum: tuple[str, str]) -> bool:
    sidecar = path.with_name(path.name + VERIFIED_SUFFIX)
    if not sidecar.is_file():
        return False
    try:
        seen = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    st = path.stat()
    return (seen.get("size"), seen.get("mtime_ns"), seen.get("algorithm"), seen.get("digest")) == (
        st.st_size, st.st_mtime_ns, checksum[0], checksum[1])


def format_status(rows: list[dict[str, Any]]) -> str:
    lines = []
    for d in rows:
        where = d["root"] or "no root configured (data.roots." + d["name"] + ")"
        state = "prepared" if d["prepared"] else "not prepared"
        lines.append(f"{d['name']} — {d['title']}{' [manual download]' if d['manual'] else ''}: {where}, {state}")
        for f in d["files"]:
            size = human_bytes(f["size"]) if f["size"] else "size not published"
            check = (f"sha256 {f['sha256']}" if "sha256" in f else f"md5 {f['md5']}" if "md5" in f
                     else "no published checksum")
            flag = ("verified" if f["present"] else "verified, archive since deleted") if f["verified"] else (
                "present" if f["present"] else "absent")
            lines.append(f"  {f['name']:<34} {size:>18}  {check}  [{flag}]")
    return "\n".join(lines)
