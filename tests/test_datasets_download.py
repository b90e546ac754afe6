"""Real datasets: catalog, download (loopback HTTP only), verification, faults, safe extraction, counts, and
the data stage that runs the same code.

A test server on 127.0.0.1 serves archives built from the synthetic data in the official archive layouts under
the official paths (tests/dataset_archives.py); the catalog's addresses are reached through ``--mirror`` and a
catalog override gives the synthetic archives' checksums, sizes and counts. A guard fails any request that is
not for 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from dataset_archives import guard_loopback, make_synthetic, official_archives, override_for, serve, serving

from densessl.cli import main
from densessl.data.acquire import MARKER, STATE, ensure_dataset, status
from densessl.data.catalog import load_catalog
from densessl.data.extract import extract
from densessl.errors import DataError

ALL = ("imagenet", "imagenet21k", "coco", "ade20k", "davis", "inat", "lvis", "cityscapes", "voc")


@pytest.fixture
def server():
    with serving() as served:
        yield served


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    guard_loopback(monkeypatch)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"))


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
    archives = official_archives("coco", synthetic["coco"])
    serve(handler, "coco", archives)
    override = tmp_path / "catalog.yaml"
    override.write_text(yaml.safe_dump(override_for("coco", archives)))
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
    archives = official_archives("inat", synthetic["inat"])
    serve(handler, "inat", archives)
    catalog = load_catalog(override_for("inat", archives))
    root = tmp_path / "inat"
    monkeypatch.setenv("DENSESSL_PROGRESS_INTERVAL", "0")  # a line per block: the interval a user sets
    with caplog.at_level("INFO", logger="densessl.progress"):
        ensure_dataset("inat", root, mirror=base, catalog=catalog)
    lines = [r.getMessage() for r in caplog.records if r.name == "densessl.progress"]
    size = r"[\d.]+ [KMG]?B"
    for verb in ("download", "SHA-256 of", "extract"):  # bytes/total (percent) · rate · elapsed · ETA, then the end
        pattern = rf"{verb} train_val2019\.tar\.gz(\.part)? {size}/{size} \([\d.]+ %\) · {size}/s · elapsed \w+ · ETA \w+"
        assert any(re.fullmatch(pattern, m) for m in lines), (verb, lines)
        assert any(re.fullmatch(pattern + r" · done in \w+", m) for m in lines), (verb, lines)
    assert not any("\r" in m for m in lines)
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
    archives = official_archives("ade20k", synthetic["ade20k"])
    serve(handler, "ade20k", archives)
    path = next(iter(handler.files))
    handler.faults[path] = ["cut"]
    ensure_dataset("ade20k", tmp_path / "ade", mirror=base, catalog=load_catalog(override_for("ade20k", archives)),
                   backoff=0.01)
    half = len(archives["ADEChallengeData2016.zip"]) // 2
    assert handler.requests == [(path, None), (path, f"bytes={half}-")]
    assert (tmp_path / "ade" / MARKER).is_file()


def test_a_server_that_ignores_range_and_keeps_cutting_fails_after_the_retries(server, synthetic, tmp_path):
    handler, base = server
    archives = official_archives("ade20k", synthetic["ade20k"])
    serve(handler, "ade20k", archives)
    path = next(iter(handler.files))
    handler.faults[path] = ["cut-ignoring-range"] * 10
    with pytest.raises(DataError, match=r"download failed after 3 retries \(connection closed after"):
        ensure_dataset("ade20k", tmp_path / "ade", mirror=base, catalog=load_catalog(override_for("ade20k", archives)),
                       retries=3, backoff=0.01)
    assert len(handler.requests) == 5  # the first try grew the file; then 4 tries that did not


def test_a_rerun_continues_an_interrupted_transfer_and_skips_finished_steps(server, synthetic, tmp_path):
    handler, base = server
    archives = official_archives("ade20k", synthetic["ade20k"])
    serve(handler, "ade20k", archives)
    catalog = load_catalog(override_for("ade20k", archives))
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
    archives = official_archives("davis", synthetic["davis"])
    serve(handler, "davis", archives)
    path = next(iter(handler.files))
    handler.faults[path] = [503, 500]
    with caplog.at_level("WARNING", logger="densessl.data"):
        ensure_dataset("davis", tmp_path / "davis", mirror=base, catalog=load_catalog(override_for("davis", archives)),
                       backoff=0.01)
    assert len(handler.requests) == 3
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2
    # too many errors in a row: one clear line
    handler.faults[path] = [503] * 10
    with pytest.raises(DataError, match=r"download failed after 2 retries \(HTTP 503"):
        ensure_dataset("davis", tmp_path / "davis2", mirror=base,
                       catalog=load_catalog(override_for("davis", archives)), retries=2, backoff=0.01)


def test_a_wrong_checksum_sets_the_file_aside_and_nothing_downstream_runs(server, synthetic, tmp_path):
    handler, base = server
    archives = official_archives("ade20k", synthetic["ade20k"])
    serve(handler, "ade20k", archives)
    wrong = "ab" * 32
    catalog = load_catalog(override_for("ade20k", archives, **{"ADEChallengeData2016.zip": {"sha256": wrong}}))
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
    archives = official_archives("ade20k", synthetic["ade20k"])
    truncated = {"ADEChallengeData2016.zip": archives["ADEChallengeData2016.zip"][:-5000]}
    serve(handler, "ade20k", truncated)
    # the published size catches it before extraction...
    sized = load_catalog(override_for("ade20k", archives, **{"ADEChallengeData2016.zip": {"sha256": None}}))
    with pytest.raises(DataError, match=r"size is [\d,]+ bytes, expected"):
        ensure_dataset("ade20k", tmp_path / "a", mirror=base, catalog=sized)
    # ...and with nothing published (like the COCO-Stuff maps) extraction refuses the archive
    bare = load_catalog(override_for("ade20k", archives, **{"ADEChallengeData2016.zip": {"sha256": None, "size": None}}))
    with pytest.raises(DataError, match="truncated or corrupt"):
        ensure_dataset("ade20k", tmp_path / "b", mirror=base, catalog=bare)
    assert not (tmp_path / "b" / MARKER).exists()
    tgz = tmp_path / "t.tar.gz"
    tgz.write_bytes(official_archives("inat", synthetic["inat"])["train_val2019.tar.gz"][:-3000])
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


# ---------------------------------------------------------------------------------------------- counts
def test_a_count_mismatch_after_preparation_stops_before_the_marker(server, synthetic, tmp_path):
    handler, base = server
    archives = official_archives("ade20k", synthetic["ade20k"])
    serve(handler, "ade20k", archives)
    override = override_for("ade20k", archives)
    override["ade20k"]["counts"][0]["expected"] = 20210
    root = tmp_path / "ade"
    with pytest.raises(DataError, match=r"training: 8 \(expected 20,210") as err:
        ensure_dataset("ade20k", root, mirror=base, catalog=load_catalog(override))
    assert "not marked complete" in str(err.value)
    assert not (root / MARKER).exists()


def test_status_lists_absent_files_without_a_root():
    rows = status(load_catalog(), {})
    assert all(not f["present"] and not f["verified"] for r in rows for f in r["files"])


def test_the_data_stage_downloads_with_data_download_true(server, synthetic, tmp_path, monkeypatch):
    """The DAG's data rule runs `densessl data`, which runs the same code as `densessl download`."""
    from densessl.config import load_config
    from densessl.data import acquire
    from densessl.stages.data import run_data

    handler, base = server
    archives = official_archives("davis", synthetic["davis"])
    serve(handler, "davis", archives)
    catalog = load_catalog(override_for("davis", archives))
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
