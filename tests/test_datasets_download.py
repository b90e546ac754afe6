"""Real datasets: catalog, download (loopback HTTP only), verification, safe extraction, preparation, counts.

A test server on 127.0.0.1 serves archives built from the synthetic data in the official archive layouts
(zip or tar as each dataset ships) under the official paths, and the catalog's addresses are reached through
``--mirror``; a catalog override gives the synthetic archives' checksums, sizes and counts. A guard fails any
request that is not for 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from densessl.cli import main
from densessl.data import download as download_mod
from densessl.data.acquire import MARKER, STATE, ensure_dataset, status
from densessl.data.catalog import load_catalog
from densessl.data.extract import extract
from densessl.data.synthetic import synthesize
from densessl.errors import DataError

ALL = ("imagenet", "imagenet21k", "coco", "ade20k", "davis", "inat", "lvis", "cityscapes", "voc")


# ---------------------------------------------------------------------------------------------- test server
class _Handler(http.server.BaseHTTPRequestHandler):
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


@pytest.fixture
def server():
    _Handler.files, _Handler.faults, _Handler.requests = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    real = download_mod._open

    def guarded(request, timeout):
        host = urlsplit(request.full_url).hostname
        assert host == "127.0.0.1", f"a test tried to reach {request.full_url}"
        return real(request, timeout)

    monkeypatch.setattr(download_mod, "_open", guarded)


# ---------------------------------------------------------------------------------------------- archives
def _zip(src: Path, arc_prefix: str, members: list[Path] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(members if members is not None else src.rglob("*")):
            if p.is_file() and not p.name.startswith(".densessl"):
                zf.write(p, f"{arc_prefix}{p.relative_to(src).as_posix()}")
    return buf.getvalue()


def _tar(src: Path, arc_prefix: str, members: list[Path], gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for p in sorted(members):
            tf.add(p, f"{arc_prefix}{p.relative_to(src).as_posix()}")
    return buf.getvalue()


def _official_archives(dataset: str, syn: Path) -> dict[str, bytes]:
    """The dataset's archives, laid out as the official ones are."""
    if dataset == "ade20k":
        return {"ADEChallengeData2016.zip": _zip(syn, "")}
    if dataset == "coco":
        return {"train2017.zip": _zip(syn / "images", ""  , list((syn / "images/train2017").iterdir())),
                "val2017.zip": _zip(syn / "images", "", list((syn / "images/val2017").iterdir())),
                "annotations_trainval2017.zip": _zip(syn, "", list((syn / "annotations").glob("*.json"))),
                "stuffthingmaps_trainval2017.zip": _zip(syn / "annotations", "",
                                                        list((syn / "annotations").glob("*2017/*.png")))}
    if dataset == "davis":
        return {"DAVIS-2017-trainval-480p.zip": _zip(syn, "DAVIS/")}
    if dataset == "inat":
        return {"train_val2019.tar.gz": _tar(syn, "", [p for p in syn.rglob("*.jpg")], gz=True),
                "train2019.json.tar.gz": _tar(syn, "", [syn / "train2019.json"], gz=True),
                "val2019.json.tar.gz": _tar(syn, "", [syn / "val2019.json"], gz=True)}
    if dataset == "cityscapes":
        return {"gtFine_trainvaltest.zip": _zip(syn, "", list((syn / "gtFine").rglob("*"))),
                "leftImg8bit_trainvaltest.zip": _zip(syn, "", list((syn / "leftImg8bit").rglob("*")))}
    raise KeyError(dataset)


TINY_COUNTS = {
    "ade20k": {"training": 8, "validation": 6, "training-maps": 8, "validation-maps": 6},
    "coco": {"train": 8, "val": 6, "train-maps": 8, "val-maps": 6, "train-instances": 8, "val-instances": 6},
    "davis": {"train": 1, "val": 2, "sequences": 3},
    "inat": {"train": 8, "val": 8, "images": 16},
    "cityscapes": {"train": 4, "val": 2, "train-instances": 4, "val-instances": 2},
}


def _override(dataset: str, archives: dict[str, bytes], **file_changes) -> dict:
    """Catalog entries for the synthetic archives: their sizes and checksums, the tiny counts."""
    out = _override_counts(dataset, archives, TINY_COUNTS[dataset])
    for f in out[dataset]["files"]:
        f.update(file_changes.get(f["name"], {}))
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    base = tmp_path_factory.mktemp("syn")
    return {d: (synthesize(d, base / d, "tiny", 0), base / d)[1] for d in TINY_COUNTS}


def _serve(handler, dataset: str, archives: dict[str, bytes]) -> None:
    catalog = load_catalog()
    for name, data in archives.items():
        handler.files[urlsplit(catalog[dataset].file(name).url).path] = data


# ---------------------------------------------------------------------------------------------- catalog
def test_catalog_has_every_dataset_with_addresses_sizes_and_published_checksums(capsys):
    catalog = load_catalog()
    assert set(ALL) <= set(catalog)
    for ds in catalog.values():
        assert ds.files and ds.counts, ds.name
        for f in ds.files:
            assert f.url.startswith(("http://", "https://")) and f.source, f.name
            # a file without a checksum says so in its source, and so does one without a byte size
            if f.checksum is None:
                assert "no published checksum" in f.source, f.name
            if f.size is None:
                assert "no published" in f.source, f.name
    assert catalog["coco"].file("train2017.zip").sha256 == (
        "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929")
    assert catalog["voc"].file("VOCtrainval_11-May-2012.tar").md5 == "6cd6e144f989b92b3379bac3b3de84fd"
    assert main(["datasets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(catalog)
    for r in rows:
        assert {"name", "manual", "files"} <= set(r)
        for f in r["files"]:
            assert {"name", "url", "size"} <= set(f) and ("sha256" in f or "md5" in f or f["size"] is None
                                                          or "no published checksum" in f["source"])
    assert {r["name"]: r["manual"] for r in rows}["cityscapes"] is True
    assert main(["datasets"]) == 0
    table = capsys.readouterr().out
    assert "cityscapes — Cityscapes, fine annotations [manual download]" in table
    assert "VOCtrainval_11-May-2012.tar" in table and "md5 6cd6e144f989b92b3379bac3b3de84fd  [absent]" in table


# ---------------------------------------------------------------------------------------------- full flow
def test_full_download_verify_extract_prepare_coco_through_the_cli(server, synthetic, tmp_path, capsys):
    handler, base = server
    archives = _official_archives("coco", synthetic["coco"])
    _serve(handler, "coco", archives)
    override = tmp_path / "catalog.yaml"
    override.write_text(yaml.safe_dump(_override("coco", archives)))
    root = tmp_path / "coco"
    assert main(["download", "--dataset", "coco", "--root", str(root), "--mirror", base,
                 "--catalog", str(override)]) == 0
    marker = json.loads((root / MARKER).read_text())
    assert {f["name"]: f["digest"] for f in marker["files"]} == {
        n: hashlib.sha256(b).hexdigest() for n, b in archives.items()}
    assert marker["counts"]["train"] == 8 and marker["counts"]["val-maps"] == 6
    # the Patch-Seg reader reads the prepared layout
    from densessl.data.coco import CocoStuffPatchSegDataset

    ds = CocoStuffPatchSegDataset(root, "val")
    image, labels = ds[0]
    assert labels.shape == (image.size[1], image.size[0])
    # every request went to the mirror under the official path; a rerun makes none
    assert sorted(p for p, _ in handler.requests) == sorted(handler.files)
    n = len(handler.requests)
    assert main(["download", "--dataset", "coco", "--root", str(root), "--mirror", base,
                 "--catalog", str(override)]) == 0
    assert len(handler.requests) == n
    # `datasets` reports the root's files as verified
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "paper", "data": {"roots": {"coco": str(root)}}}))
    capsys.readouterr()
    assert main(["datasets", "--json", "--config", str(cfg), "--catalog", str(override)]) == 0
    coco = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "coco")
    assert coco["prepared"] and all(f["verified"] for f in coco["files"])


def test_tar_gz_dataset_progress_lines_and_the_manifest_records_checksums(server, synthetic, tmp_path, caplog,
                                                                          monkeypatch):
    handler, base = server
    archives = _official_archives("inat", synthetic["inat"])
    _serve(handler, "inat", archives)
    catalog = load_catalog(_override("inat", archives))
    root = tmp_path / "inat"
    with caplog.at_level("INFO", logger="densessl.data"):
        ensure_dataset("inat", root, mirror=base, catalog=catalog, interval=0.0)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("download train_val2019.tar.gz:") and "/s" in m and "ETA" in m for m in lines)
    assert any(m.startswith("extract train_val2019.tar.gz:") for m in lines)
    # the paper-scale data stage records the verified checksums in the manifest
    from densessl.config import load_config
    from densessl.stages.data import run_data

    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({"preset": "paper", "results_dir": str(tmp_path / "results"),
                                        "data": {"roots": {"inat": str(root)}}}))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    manifest = json.loads(run_data(load_config([cfg_file]), "inat").read_text())
    assert {f["name"]: f["digest"] for f in manifest["verified_files"]} == {
        n: hashlib.sha256(b).hexdigest() for n, b in archives.items()}
    assert manifest["fingerprint"]["files_per_top_folder"].keys() == {"train2019.json", "val2019.json",
                                                                       "train_val2019"}


# ---------------------------------------------------------------------------------------------- faults
def test_a_transfer_cut_in_the_middle_is_resumed_with_a_range_request(server, synthetic, tmp_path):
    handler, base = server
    archives = _official_archives("ade20k", synthetic["ade20k"])
    _serve(handler, "ade20k", archives)
    path = next(iter(handler.files))
    handler.faults[path] = ["cut"]
    ensure_dataset("ade20k", tmp_path / "ade", mirror=base, catalog=load_catalog(_override("ade20k", archives)),
                   backoff=0.01)
    half = len(archives["ADEChallengeData2016.zip"]) // 2
    assert handler.requests == [(path, None), (path, f"bytes={half}-")]
    assert (tmp_path / "ade" / MARKER).is_file()


def test_a_server_that_ignores_range_and_keeps_cutting_fails_after_the_retries(server, synthetic, tmp_path):
    handler, base = server
    archives = _official_archives("ade20k", synthetic["ade20k"])
    _serve(handler, "ade20k", archives)
    path = next(iter(handler.files))
    handler.faults[path] = ["cut-ignoring-range"] * 10
    with pytest.raises(DataError, match=r"download failed after 3 retries \(connection closed after"):
        ensure_dataset("ade20k", tmp_path / "ade", mirror=base, catalog=load_catalog(_override("ade20k", archives)),
                       retries=3, backoff=0.01)
    assert len(handler.requests) == 5  # the first try grew the file; then 4 tries that did not


def test_a_rerun_continues_an_interrupted_transfer_and_skips_finished_steps(server, synthetic, tmp_path):
    handler, base = server
    archives = _official_archives("ade20k", synthetic["ade20k"])
    _serve(handler, "ade20k", archives)
    catalog = load_catalog(_override("ade20k", archives))
    root = tmp_path / "ade"
    data = archives["ADEChallengeData2016.zip"]
    part = root / ".densessl-downloads" / "ADEChallengeData2016.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])  # what a killed process left
    ensure_dataset("ade20k", root, mirror=base, catalog=catalog)
    assert [r for _, r in handler.requests] == ["bytes=1000-"]
    # an interruption after extraction: the marker is missing, the extraction record is not
    (root / MARKER).unlink()
    (root / STATE / "prepared.json").unlink()
    (root / "ADEChallengeData2016" / "objectInfo_written_by_user.txt").write_text("kept")
    ensure_dataset("ade20k", root, mirror=base, catalog=catalog)
    assert len(handler.requests) == 1 and (root / MARKER).is_file()


def test_a_server_error_is_retried_with_back_off_then_succeeds(server, synthetic, tmp_path, caplog):
    handler, base = server
    archives = _official_archives("davis", synthetic["davis"])
    _serve(handler, "davis", archives)
    path = next(iter(handler.files))
    handler.faults[path] = [503, 500]
    with caplog.at_level("WARNING", logger="densessl.data"):
        ensure_dataset("davis", tmp_path / "davis", mirror=base, catalog=load_catalog(_override("davis", archives)),
                       backoff=0.01)
    assert len(handler.requests) == 3
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2
    # too many errors in a row: one clear line
    handler.faults[path] = [503] * 10
    with pytest.raises(DataError, match=r"download failed after 2 retries \(HTTP 503"):
        ensure_dataset("davis", tmp_path / "davis2", mirror=base,
                       catalog=load_catalog(_override("davis", archives)), retries=2, backoff=0.01)


def test_a_wrong_checksum_sets_the_file_aside_and_nothing_downstream_runs(server, synthetic, tmp_path):
    handler, base = server
    archives = _official_archives("ade20k", synthetic["ade20k"])
    _serve(handler, "ade20k", archives)
    wrong = "ab" * 32
    catalog = load_catalog(_override("ade20k", archives, **{"ADEChallengeData2016.zip": {"sha256": wrong}}))
    root = tmp_path / "ade"
    actual = hashlib.sha256(archives["ADEChallengeData2016.zip"]).hexdigest()
    with pytest.raises(DataError) as err:
        ensure_dataset("ade20k", root, mirror=base, catalog=catalog)
    message = str(err.value)
    assert "ADEChallengeData2016.zip" in message and wrong in message and actual in message
    aside = root / ".densessl-downloads" / f"ADEChallengeData2016.zip.bad-{actual[:12]}"
    assert aside.is_file() and aside.read_bytes() == archives["ADEChallengeData2016.zip"]
    assert not (root / ".densessl-downloads" / "ADEChallengeData2016.zip").exists()
    assert not (root / "ADEChallengeData2016").exists() and not (root / MARKER).exists()
    assert not list((root / STATE).iterdir())


def test_a_truncated_archive_is_a_clear_error(server, synthetic, tmp_path):
    handler, base = server
    archives = _official_archives("ade20k", synthetic["ade20k"])
    truncated = {"ADEChallengeData2016.zip": archives["ADEChallengeData2016.zip"][:-5000]}
    _serve(handler, "ade20k", truncated)
    # the published size catches it before extraction...
    sized = load_catalog(_override("ade20k", archives, **{"ADEChallengeData2016.zip": {"sha256": None}}))
    with pytest.raises(DataError, match=r"size is [\d,]+ bytes, expected"):
        ensure_dataset("ade20k", tmp_path / "a", mirror=base, catalog=sized)
    # ...and with nothing published (like the COCO-Stuff maps) extraction refuses the archive
    bare = load_catalog(_override("ade20k", archives, **{"ADEChallengeData2016.zip": {"sha256": None, "size": None}}))
    with pytest.raises(DataError, match="truncated or corrupt"):
        ensure_dataset("ade20k", tmp_path / "b", mirror=base, catalog=bare)
    assert not (tmp_path / "b" / MARKER).exists()
    tgz = tmp_path / "t.tar.gz"
    tgz.write_bytes(_official_archives("inat", synthetic["inat"])["train_val2019.tar.gz"][:-3000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        extract(tgz, tmp_path / "t", "tar.gz")


def _evil_zip(path: Path, name: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(name, "escaped")


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        tf.addfile(member, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("case", ["zip-dotdot", "zip-absolute", "zip-symlink", "tar-dotdot", "tar-absolute",
                                  "tar-symlink", "tar-hardlink"])
def test_members_escaping_the_target_are_refused_and_nothing_is_written(tmp_path, case):
    target = tmp_path / "out" / "target"
    archive = tmp_path / ("a.zip" if case.startswith("zip") else "a.tar")
    if case == "zip-dotdot":
        _evil_zip(archive, "../../evil.txt")
        expected = "outside the target folder"
    elif case == "zip-absolute":
        _evil_zip(archive, "/tmp/evil.txt")
        expected = "absolute path"
    elif case == "zip-symlink":
        with zipfile.ZipFile(archive, "w") as zf:
            info = zipfile.ZipInfo("link")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "../../outside")
        expected = "link to '../../outside', outside the target folder"
    else:
        kind = case.split("-")[1]
        m = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "link"))
        data = b""
        if kind in ("dotdot", "absolute"):
            data = b"escaped"
            m.size = len(data)
        elif kind == "symlink":
            m.type, m.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        else:
            m.type, m.linkname = tarfile.LNKTYPE, "../outside.txt"
        _evil_tar(archive, m, data)
        expected = {"dotdot": "outside the target folder", "absolute": "absolute path",
                    "symlink": "outside the target folder", "hardlink": "outside the target folder"}[kind]
    with pytest.raises(DataError, match="refus|nothing more is extracted") as err:
        extract(archive, target, "zip" if case.startswith("zip") else "tar")
    assert expected in str(err.value) and archive.name in str(err.value)
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (target / "ok.txt").exists()  # checked before anything was written
    assert not Path("/tmp/evil.txt").exists()


# ---------------------------------------------------------------------------------------------- manual data
def test_a_manual_dataset_not_placed_names_the_files_the_folder_and_the_verify_command(server, tmp_path):
    handler, _ = server
    root = tmp_path / "imagenet"
    with pytest.raises(DataError) as err:
        ensure_dataset("imagenet", root)
    message = str(err.value)
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        assert str(root / ".densessl-downloads" / name) in message
    assert "1d675b47d978889d74fa0da5fadfb00e" in message and "image-net.org" in message
    assert f"python -m densessl download --dataset imagenet --root {root}" in message
    assert handler.requests == []  # nothing is fetched for a manual dataset
    assert not root.exists()  # and nothing is written
    assert main(["download", "--dataset", "cityscapes", "--root", str(tmp_path / "cs")]) == 2


def test_a_placed_manual_dataset_is_verified_and_prepared_with_cityscapesscripts(synthetic, tmp_path):
    import numpy as np
    from PIL import Image

    archives = _official_archives("cityscapes", synthetic["cityscapes"])
    root = tmp_path / "cityscapes"
    (root / ".densessl-downloads").mkdir(parents=True)
    for name, data in archives.items():
        (root / ".densessl-downloads" / name).write_bytes(data)
    ensure_dataset("cityscapes", root, catalog=load_catalog(_override("cityscapes", archives)))
    inst = sorted((root / "gtFine" / "train").glob("*/*_gtFine_instanceTrainIds.png"))
    assert len(inst) == 4
    ids = np.asarray(Image.open(inst[0]))
    labels = np.asarray(Image.open(str(inst[0]).replace("instanceTrainIds", "labelTrainIds")))
    # instance pixels carry trainId * 1000 + k, and agree with the semantic trainIds map
    things = ids >= 1000
    assert things.any() and (ids[things] // 1000 == labels[things]).all()


# ---------------------------------------------------------------------------------------------- counts
def test_a_count_mismatch_after_preparation_stops_before_the_marker(server, synthetic, tmp_path):
    handler, base = server
    archives = _official_archives("ade20k", synthetic["ade20k"])
    _serve(handler, "ade20k", archives)
    override = _override("ade20k", archives)
    override["ade20k"]["counts"][0]["expected"] = 20210
    root = tmp_path / "ade"
    with pytest.raises(DataError, match=r"training: 8 \(expected 20,210") as err:
        ensure_dataset("ade20k", root, mirror=base, catalog=load_catalog(override))
    assert "not marked complete" in str(err.value)
    assert not (root / MARKER).exists()


def test_status_lists_absent_files_without_a_root():
    rows = status(load_catalog(), {})
    assert all(not f["present"] and not f["verified"] for r in rows for f in r["files"])


def _imagenet_archives(syn: Path, tmp: Path) -> dict[str, bytes]:
    """ILSVRC 2012 as distributed: a train tar of per-class tars, a flat val tar, a devkit with meta.mat."""
    import numpy as np
    import scipy.io

    wnids = sorted(p.name for p in (syn / "train").iterdir())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as outer:
        for w in wnids:
            inner = _tar(syn / "train" / w, "", list((syn / "train" / w).iterdir()), gz=False)
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
    devkit = _tar(tmp, "", [data / "meta.mat", data / "ILSVRC2012_validation_ground_truth.txt"], gz=True)
    return {"ILSVRC2012_img_train.tar": train, "ILSVRC2012_img_val.tar": val, "ILSVRC2012_devkit_t12.tar.gz": devkit}


def test_placed_imagenet_archives_are_expanded_and_val_sorted_into_class_folders(tmp_path):
    syn = tmp_path / "syn"
    synthesize("imagenet", syn, "tiny", 0)
    archives = _imagenet_archives(syn, tmp_path / "devkit-src")
    root = tmp_path / "imagenet"
    for name, data in archives.items():  # placed directly in the root, as users often do
        root.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    override = _override_counts("imagenet", archives, {"train": 16, "val": 8})
    ensure_dataset("imagenet", root, catalog=load_catalog(override))
    expected = sorted(p.relative_to(syn).as_posix() for p in (syn / "train").glob("*/*.JPEG"))
    assert sorted(p.relative_to(root).as_posix() for p in (root / "train").glob("*/*.JPEG")) == expected
    assert not list((root / "train").glob("*.tar"))
    # every validation image lands in the folder of its class, with the same bytes
    for p in sorted((syn / "val").glob("*/*.JPEG")):
        matches = [q for q in (root / "val" / p.parent.name).iterdir() if q.read_bytes() == p.read_bytes()]
        assert len(matches) == 1


def _override_counts(dataset: str, archives: dict[str, bytes], counts: dict[str, int]) -> dict:
    files = [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest(), "md5": None}
             for n, b in archives.items()]
    return {dataset: {"files": files, "counts": [{"split": s, "expected": n} for s, n in counts.items()]}}


def test_imagenet21k_class_archives_are_expanded_into_train(tmp_path):
    syn = tmp_path / "syn"
    synthesize("imagenet", syn, "tiny", 0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as outer:
        for d in sorted((syn / "train").iterdir()):
            inner = _tar(d, "", list(d.iterdir()), gz=False)
            info = tarfile.TarInfo(f"winter21_whole/{d.name}.tar")
            info.size = len(inner)
            outer.addfile(info, io.BytesIO(inner))
    archives = {"winter21_whole.tar.gz": buf.getvalue()}
    root = tmp_path / "in21k"
    (root / ".densessl-downloads").mkdir(parents=True)
    (root / ".densessl-downloads" / "winter21_whole.tar.gz").write_bytes(archives["winter21_whole.tar.gz"])
    classes = len(list((syn / "train").iterdir()))
    ensure_dataset("imagenet21k", root, catalog=load_catalog(_override_counts("imagenet21k", archives,
                                                                              {"train": classes})))
    assert sorted(p.relative_to(root / "train").as_posix() for p in (root / "train").glob("*/*.JPEG")) == sorted(
        p.relative_to(syn / "train").as_posix() for p in (syn / "train").glob("*/*.JPEG"))


def test_an_extracted_copy_without_archives_is_counted_not_downloaded(server, synthetic, tmp_path):
    import shutil

    handler, base = server
    root = tmp_path / "ade"
    shutil.copytree(synthetic["ade20k"], root)
    archives = _official_archives("ade20k", synthetic["ade20k"])
    marker = ensure_dataset("ade20k", root, mirror=base, catalog=load_catalog(_override("ade20k", archives)))
    assert marker["archives_verified"] is False and marker["counts"]["validation"] == 6
    assert handler.requests == []


def test_the_data_stage_downloads_with_data_download_true(server, synthetic, tmp_path, monkeypatch):
    """The DAG's data rule runs `densessl data`, which runs the same code as `densessl download`."""
    from densessl.config import load_config
    from densessl.data import acquire
    from densessl.stages.data import run_data

    handler, base = server
    archives = _official_archives("davis", synthetic["davis"])
    _serve(handler, "davis", archives)
    catalog = load_catalog(_override("davis", archives))
    monkeypatch.setattr(acquire, "load_catalog", lambda *a, **k: catalog)
    cfg_file = tmp_path / "config.yaml"
    root = tmp_path / "davis"
    cfg_file.write_text(yaml.safe_dump({"preset": "paper", "results_dir": str(tmp_path / "results"),
                                        "data": {"download": True, "mirror": base, "roots": {"davis": str(root)}}}))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    manifest = json.loads(run_data(load_config([cfg_file]), "davis").read_text())
    assert [p for p, _ in handler.requests] == list(handler.files)
    assert manifest["verified_files"][0]["digest"] == hashlib.sha256(
        archives["DAVIS-2017-trainval-480p.zip"]).hexdigest()
    assert manifest["prepared_counts"] == {"train": 1, "val": 2, "sequences": 3}
    from densessl.data.davis import resolve_davis_root

    assert resolve_davis_root(root) == root / "DAVIS"


def _voc_tar(images: list[Path], year: str, split: str) -> bytes:
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


def test_voc_tars_checked_by_their_published_md5_merge_into_vocdevkit(server, synthetic, tmp_path):
    handler, base = server
    jpgs = sorted((synthetic["coco"] / "images" / "train2017").glob("*.jpg"))
    archives = {"VOCtrainval_06-Nov-2007.tar": _voc_tar(jpgs[:3], "2007", "trainval"),
                "VOCtest_06-Nov-2007.tar": _voc_tar(jpgs[3:5], "2007", "test"),
                "VOCtrainval_11-May-2012.tar": _voc_tar(jpgs[5:], "2012", "trainval")}
    _serve(handler, "voc", archives)
    override = {"voc": {"files": [{"name": n, "size": len(b), "md5": hashlib.md5(b).hexdigest()}
                                  for n, b in archives.items()],
                        "counts": [{"split": "2007-trainval", "expected": 3}, {"split": "2007-test", "expected": 2},
                                   {"split": "2012-trainval", "expected": len(jpgs) - 5}]}}
    catalog = load_catalog(override)
    assert catalog["voc"].file("VOCtest_06-Nov-2007.tar").checksum[0] == "md5"
    marker = ensure_dataset("voc", tmp_path / "voc", mirror=base, catalog=catalog)
    assert {f["algorithm"] for f in marker["files"]} == {"md5"}
    assert len(list((tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages").iterdir())) == 5


def test_lvis_json_zips_and_links_to_the_coco_images(server, tmp_path):
    import shutil

    handler, base = server
    syn = tmp_path / "syn"
    synthesize("lvis", syn, "tiny", 0)
    archives = {f"{n}.zip": _zip(syn, "", [syn / n]) for n in ("lvis_v1_train.json", "lvis_v1_val.json")}
    _serve(handler, "lvis", archives)
    coco = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        shutil.copytree(syn / split, coco / "images" / split)
    override = _override_counts("lvis", archives, {"train": 8, "val": 4})
    root = tmp_path / "lvis"
    marker = ensure_dataset("lvis", root, mirror=base, catalog=load_catalog(override), coco_root=coco)
    assert marker["counts"] == {"train": 8, "val": 4}
    assert (root / "train2017").resolve() == (coco / "images" / "train2017").resolve()
    # a COCO root missing an image the annotations name is refused
    victim = sorted((coco / "images" / "val2017").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"1 of its \d+ images are not under"):
        ensure_dataset("lvis", root, catalog=load_catalog(override), coco_root=coco)
