"""Data stage: synthesise (smoke) or get and check (paper) a dataset, then write its manifest.

At paper scale with ``data.download: true`` the stage runs the same code as ``densessl download`` (download or
verify, extract, prepare, count) into the configured root first. Either way, a root prepared by densessl has a
completion marker whose verified archive checksums the manifest records, so provenance and DVC carry the real
data's identity and not only a file listing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from densessl import provenance
from densessl.config import Config
from densessl.data.manifest import check_layout, fingerprint
from densessl.errors import ConfigError
from densessl.io import write_json


def run_data(cfg: Config, dataset: str) -> Path:
    started = time.time()
    settings = cfg.data_settings(dataset)
    manifest_path = cfg.data_manifest(dataset)
    if settings["synthetic"]:
        from densessl.data.synthetic import resized, synthesize

        root = manifest_path.parent / "files"
        if root.exists():
            shutil.rmtree(root)
        counts = settings.get("counts")
        size = resized(settings["size"], {dataset: counts} if counts else None, "data.synthetic_counts")
        summary = synthesize(dataset, root, size, settings["seed"])
        source = {"synthetic": True, "size": settings["size"], "seed": settings["seed"], "summary": summary}
    else:
        if not settings["root"]:
            raise ConfigError(f"data.roots.{dataset} is not set: the {cfg.preset} preset reads real data; "
                              f"add 'data: {{roots: {{{dataset}: /path/to/{dataset}}}}}' to config.yaml")
        root = Path(settings["root"]).expanduser().resolve()
        from densessl.data.acquire import ensure_dataset, read_marker

        d = cfg.data.get("data", {})
        if settings.get("download"):
            coco = (d.get("roots") or {}).get("coco") if dataset == "lvis" else None
            ensure_dataset(dataset, root, mirror=d.get("mirror"), coco_root=coco)
        marker = read_marker(root)
        source = {"synthetic": False,
                  "verified_files": [{k: f[k] for k in ("name", "size", "algorithm", "digest", "published_checksum")}
                                     for f in marker["files"]] if marker else None,
                  "prepared_counts": marker["counts"] if marker else None,
                  "archives_verified": marker.get("archives_verified") if marker else None}
    check_layout(dataset, root)
    if dataset == "cityscapes":  # mmdet reads COCO-style instance files made from gtFine (data/cityscapes.py)
        from densessl.data.cityscapes import convert

        source["converted"] = {"folder": "annotations", "splits": convert(root, manifest_path.parent / "annotations")}
    # A root inside the results folder is stored relative to the manifest, so results can be moved or shared.
    root = root.resolve()
    here = manifest_path.parent.resolve()
    stored_root = str(root.relative_to(here)) if root.is_relative_to(here) else str(root)
    manifest = {"dataset": dataset, "root": stored_root, **source, "fingerprint": fingerprint(root),
                "provenance": provenance.collect("data", cfg.hash, started=started)}
    write_json(manifest_path, manifest)
    return manifest_path
