"""Loopback HTTP server and archive builders for the real-dataset tests.

The server serves archives built from the synthetic data in the official archive layouts (zip, tar or tar.gz
as each dataset ships) under the official paths, so the catalog's addresses are reached through ``--mirror``;
``override_for`` gives the synthetic archives' checksums, sizes and counts as a catalog override, and
``guard_loopback`` fails any request that is not for 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from densessl.data import download as download_mod
from densessl.data.catalog import load_catalog
from densessl.data.synthetic import synthesize


class Handler(http.server.BaseHTTPRequestHandler):
    """Files by path with single-range support; ``faults[path]`` is a list of what the next requests get:
    "cut" (headers for the whole file, half the bytes, connection closed), "cut-ignoring-range" (the same
    from byte 0 whatever the Range header) or an HTTP status code."""

    files: dict[str, bytes] = {}
    faults: dict[str, list] = {}
    requests: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        type(self).requests.append((self.path, rng))
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        pending = self.faults.get(self.path) or []
        fault = pending.pop(0) if pending else None
        if isinstance(fault, int):
            self.send_error(fault)
            return
        if fault == "cut-ignoring-range":  # a server without Range support that drops the connection
            rng, fault = None, "cut"
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def zip_of(src: Path, arc_prefix: str, members: list[Path] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(members if members is not None else src.rglob("*")):
            if p.is_file() and not p.name.startswith(".densessl"):
                zf.write(p, f"{arc_prefix}{p.relative_to(src).as_posix()}")
    return buf.getvalue()


def tar_of(src: Path, arc_prefix: str, members: list[Path], gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for p in sorted(members):
            tf.add(p, f"{arc_prefix}{p.relative_to(src).as_posix()}")
    return buf.getvalue()


def official_archives(dataset: str, syn: Path) -> dict[str, bytes]:
    """The dataset's archives, laid out as the official ones are."""
    if dataset == "ade20k":
        return {"ADEChallengeData2016.zip": zip_of(syn, "")}
    if dataset == "coco":
        return {"train2017.zip": zip_of(syn / "images", ""  , list((syn / "images/train2017").iterdir())),
                "val2017.zip": zip_of(syn / "images", "", list((syn / "images/val2017").iterdir())),
                "annotations_trainval2017.zip": zip_of(syn, "", list((syn / "annotations").glob("*.json"))),
                "stuffthingmaps_trainval2017.zip": zip_of(syn / "annotations", "",
                                                        list((syn / "annotations").glob("*2017/*.png")))}
    if dataset == "davis":
        return {"DAVIS-2017-trainval-480p.zip": zip_of(syn, "DAVIS/")}
    if dataset == "inat":
        return {"train_val2019.tar.gz": tar_of(syn, "", [p for p in syn.rglob("*.jpg")], gz=True),
                "train2019.json.tar.gz": tar_of(syn, "", [syn / "train2019.json"], gz=True),
                "val2019.json.tar.gz": tar_of(syn, "", [syn / "val2019.json"], gz=True)}
    if dataset == "cityscapes":
        return {"gtFine_trainvaltest.zip": zip_of(syn, "", list((syn / "gtFine").rglob("*"))),
                "leftImg8bit_trainvaltest.zip": zip_of(syn, "", list((syn / "leftImg8bit").rglob("*")))}
    raise KeyError(dataset)


TINY_COUNTS = {
    "ade20k": {"training": 8, "validation": 6, "training-maps": 8, "validation-maps": 6},
    "coco": {"train": 8, "val": 6, "train-maps": 8, "val-maps": 6, "train-instances": 8, "val-instances": 6},
    "davis": {"train": 1, "val": 2, "sequences": 3},
    "inat": {"train": 8, "val": 8, "images": 16},
    "cityscapes": {"train": 4, "val": 2, "train-instances": 4, "val-instances": 2},
}


def override_for(dataset: str, archives: dict[str, bytes], **file_changes) -> dict:
    """Catalog entries for the synthetic archives: their sizes and checksums, the tiny counts."""
    out = override_counts(dataset, archives, TINY_COUNTS[dataset])
    for f in out[dataset]["files"]:
        f.update(file_changes.get(f["name"], {}))
    return out


def serve(handler, dataset: str, archives: dict[str, bytes]) -> None:
    catalog = load_catalog()
    for name, data in archives.items():
        handler.files[urlsplit(catalog[dataset].file(name).url).path] = data


def imagenet_archives(syn: Path, tmp: Path) -> dict[str, bytes]:
    """ILSVRC 2012 as distributed: a train tar of per-class tars, a flat val tar, a devkit with meta.mat."""
    import numpy as np
    import scipy.io

    wnids = sorted(p.name for p in (syn / "train").iterdir())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as outer:
        for w in wnids:
            inner = tar_of(syn / "train" / w, "", list((syn / "train" / w).iterdir()), gz=False)
            info = tarfile.TarInfo(f"{w}.tar")
            info.size = len(inner)
            outer.addfile(info, io.BytesIO(inner))
    train = buf.getvalue()
    val_images = sorted((syn / "val").glob("*/*.JPEG"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, p in enumerate(val_images):
            tf.add(p, f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    val = buf.getvalue()
    ids = {w: i + 1 for i, w in enumerate(wnids)}
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.zeros((len(wnids) + 1,), dtype=dt)
    for w, i in ids.items():
        synsets[i - 1] = (i, w, w, "", 0)
    synsets[-1] = (len(wnids) + 1, "n00000000", "entity", "", 3)  # an inner node of the hierarchy: no images
    data = tmp / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[p.parent.name]}\n" for p in val_images))
    devkit = tar_of(tmp, "", [data / "meta.mat", data / "ILSVRC2012_validation_ground_truth.txt"], gz=True)
    return {"ILSVRC2012_img_train.tar": train, "ILSVRC2012_img_val.tar": val, "ILSVRC2012_devkit_t12.tar.gz": devkit}


def override_counts(dataset: str, archives: dict[str, bytes], counts: dict[str, int]) -> dict:
    files = [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest(), "md5": None}
             for n, b in archives.items()]
    return {dataset: {"files": files, "counts": [{"split": s, "expected": n} for s, n in counts.items()]}}


def voc_tar(images: list[Path], year: str, split: str) -> bytes:
    """A VOCdevkit/VOC<year> tar (the official archives' layout) holding ``images`` and a Main/<split> list."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"VOCdevkit/VOC{year}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for p in images:
            add(f"JPEGImages/{p.name}", p.read_bytes())
            add(f"Annotations/{p.stem}.xml", f"<annotation><filename>{p.name}</filename></annotation>".encode())
        add(f"ImageSets/Main/{split}.txt", "".join(f"{p.stem}\n" for p in images).encode())
    return buf.getvalue()


@contextlib.contextmanager
def serving() -> Iterator[tuple[type[Handler], str]]:
    Handler.files, Handler.faults, Handler.requests = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def guard_loopback(monkeypatch) -> None:  # noqa: ANN001
    real = download_mod._open

    def guarded(request, timeout):  # noqa: ANN001, ANN202
        host = urlsplit(request.full_url).hostname
        assert host == "127.0.0.1", f"a test tried to reach {request.full_url}"
        return real(request, timeout)

    monkeypatch.setattr(download_mod, "_open", guarded)


def make_synthetic(base: Path) -> dict[str, Path]:
    """Tiny synthetic copies of the datasets whose archives the tests build."""
    return {d: (synthesize(d, base / d, "tiny", 0), base / d)[1] for d in TINY_COUNTS}
