"""The dataset catalog: every dataset, its files (address, size, checksum, published source) and the image
counts its preparation must reach, read from ``catalog.yaml`` next to this module.

Why a table: the addresses and checksums are data, not code, so one file says where everything comes from and
how it is checked, ``densessl datasets`` prints it, and a test (or a site with its own copies) can lay an
override file over it without touching code. An override has the catalog's shape and is merged key by key;
files are matched by name.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from densessl.errors import DataError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
FORMATS = ("zip", "tar", "tar.gz")


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset as published: where it is, how big, its checksum and where that figure comes from."""

    name: str
    url: str
    source: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    extract_to: str = "."
    format: str = "zip"

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) of the strongest published checksum, or None where none is published."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None

    def url_for(self, mirror: str | None) -> str:
        """The official address, or the same path on ``mirror`` (scheme://host[/prefix]) when one is given:
        cluster mirrors keep the official path, and the checksum stays the catalog's."""
        if not mirror:
            return self.url
        parts = urlsplit(self.url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return mirror.rstrip("/") + path


@dataclass(frozen=True)
class CountSpec:
    """An image (or sequence, or class) count a prepared dataset must have."""

    split: str
    kind: str  # glob | dirs | lines | json
    expected: int
    source: str = ""
    pattern: str | None = None
    path: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    manual: bool
    homepage: str
    prepare: str
    files: tuple[FileSpec, ...]
    counts: tuple[CountSpec, ...] = ()
    layout: tuple[str, ...] = ()
    how: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> FileSpec:
        for f in self.files:
            if f.name == name:
                return f
        raise DataError(f"dataset {self.name!r} has no file {name!r}; files: {[f.name for f in self.files]}")


def _format_of(name: str) -> str:
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    raise DataError(f"catalog file {name!r}: cannot tell its archive format; set 'format' to one of {FORMATS}")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for name, spec in override.items():
        if name not in out:
            out[name] = copy.deepcopy(spec)
            continue
        for key, value in spec.items():
            if key == "files":
                by_name = {f["name"]: f for f in out[name].get("files", [])}
                for f in value:
                    by_name[f["name"]] = {**by_name.get(f["name"], {}), **f}
                out[name]["files"] = list(by_name.values())
            elif key == "counts":
                by_split = {c["split"]: c for c in out[name].get("counts", [])}
                for c in value:
                    by_split[c["split"]] = {**by_split.get(c["split"], {}), **c}
                out[name]["counts"] = list(by_split.values())
            else:
                out[name][key] = copy.deepcopy(value)
    return out


def _build(name: str, raw: dict[str, Any], where: str) -> DatasetSpec:
    try:
        files = []
        for f in raw["files"]:
            size = f.get("size")
            files.append(FileSpec(name=f["name"], url=f["url"], source=str(f.get("source", "")),
                                  size=int(size) if size is not None else None, sha256=f.get("sha256"),
                                  md5=f.get("md5"), extract_to=str(f.get("extract_to", ".")),
                                  format=f.get("format") or _format_of(f["name"])))
        counts = tuple(CountSpec(**c) for c in raw.get("counts", []))
        return DatasetSpec(name=name, title=raw.get("title", name), manual=bool(raw.get("manual", False)),
                           homepage=raw.get("homepage", ""), prepare=raw.get("prepare", "extract"),
                           files=tuple(files), counts=counts, layout=tuple(raw.get("layout", [])),
                           how=raw.get("how", ""))
    except (KeyError, TypeError) as exc:
        raise DataError(f"{where}: dataset {name!r} is malformed ({exc!r}); each file needs name and url, each "
                        f"count split, kind and expected") from exc


def load_catalog(override: str | os.PathLike[str] | dict[str, Any] | None = None) -> dict[str, DatasetSpec]:
    """The built-in catalog, with ``override`` (a YAML file or a dict of the same shape) laid over it."""
    raw = yaml.safe_load(CATALOG_PATH.read_text(encoding="utf-8"))
    where = str(CATALOG_PATH)
    if override is not None:
        if not isinstance(override, dict):
            path = Path(override)
            if not path.is_file():
                raise DataError(f"{path}: catalog override file not found")
            override = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            where = f"{CATALOG_PATH} + {path}"
        raw = _merge(raw, override)
    return {name: _build(name, spec, where) for name, spec in raw.items()}


def dataset_spec(name: str, catalog: dict[str, DatasetSpec] | None = None) -> DatasetSpec:
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        raise DataError(f"dataset {name!r} is not in the catalog; choose one of {', '.join(sorted(catalog))}")
    return catalog[name]
