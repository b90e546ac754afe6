"""Released weights whose publishers print no checksum: ``sha256: record`` records the file's SHA-256 on first use
(loopback HTTP or a manually placed file) and verifies every later use; a changed file is refused; a missing
manual file names its page, its path and the command; the paper preset's releases fill their rows."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from test_released import _official_dino_file, _RangeHandler, server  # noqa: F401 (the loopback server fixture)

from densessl.checkpoints import released as rel
from densessl.checkpoints.importers import clove_target_resnet50, import_checkpoint
from densessl.checkpoints.io import load_backbone
from densessl.config import load_config
from densessl.errors import CheckpointError, ConfigError
from densessl.io import atomic_path
from densessl.stages.convert import run_convert

RUN = "dino/vit-tiny-p8-imagenet-released"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cfg(tmp_path: Path, spec: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "released_lock": str(tmp_path / "lock.yaml"),
                                    "released": [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet",
                                                  "format": "dino", "sha256": "record", **spec}]}))
    return load_config([path], root=REPO)


def test_first_download_records_the_checksum_and_later_uses_verify_it(server, tmp_path):  # noqa: F811
    root, base = server
    file = root / "dino_official.pth"
    _official_dino_file(file)
    cfg = _cfg(tmp_path, {"url": f"{base}/dino_official.pth"})
    assert cfg.released_lock == tmp_path / "lock.yaml" and not cfg.released_lock.exists()

    _, meta = load_backbone(run_convert(cfg, RUN))
    entry = rel.read_lock(cfg.released_lock)[RUN]
    assert (entry["url"], entry["sha256"], entry["size"]) == (f"{base}/dino_official.pth", _sha(file),
                                                               file.stat().st_size)
    assert entry["recorded"].endswith("Z") and "@" in entry["by"]
    assert meta["source"]["checksum"] == "recorded on first download"
    assert meta["source"]["file_sha256"] == _sha(file)
    text = cfg.released_lock.read_text()
    assert text.startswith("# SHA-256 of released weights") and "schema: densessl.released-lock/1" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lock.yaml")] == []  # no temporary left

    requests = len(_RangeHandler.requests)
    run_convert(cfg, RUN)  # the downloaded file verifies against the record: no request, the record unchanged
    assert len(_RangeHandler.requests) == requests and rel.read_lock(cfg.released_lock)[RUN] == entry

    # the publisher's file changes: a fresh download is refused with the recorded hash, date and the fix
    download = cfg.release_download_path(cfg.run(RUN))
    download.unlink()
    torch.save({"teacher": {}}, file)
    with pytest.raises(CheckpointError) as err:
        run_convert(cfg, RUN)
    message = str(err.value)
    assert "\n" not in message and entry["sha256"] in message and entry["recorded"] in message
    assert "the file changed since" in message and f"delete that entry from {cfg.released_lock}" in message
    assert not download.exists() and rel.read_lock(cfg.released_lock)[RUN] == entry


def test_a_changed_local_download_is_refused(server, tmp_path):  # noqa: F811
    root, base = server
    _official_dino_file(root / "dino_official.pth")
    cfg = _cfg(tmp_path, {"url": f"{base}/dino_official.pth"})
    run_convert(cfg, RUN)
    download = cfg.release_download_path(cfg.run(RUN))
    data = download.read_bytes()
    download.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte differs
    with pytest.raises(CheckpointError, match="the download does not match .*the file changed since"):
        run_convert(cfg, RUN)


def test_a_manual_file_missing_names_the_page_the_path_and_the_command(tmp_path):
    target = tmp_path / "weights" / "dino_official.pth"
    cfg = _cfg(tmp_path, {"path": str(target), "page": "https://drive.google.com/file/d/XYZ/view"})
    with pytest.raises(CheckpointError) as err:
        run_convert(cfg, RUN)
    message = str(err.value)
    assert "\n" not in message
    assert "download it by hand from https://drive.google.com/file/d/XYZ/view" in message
    assert f"place it at {target}" in message
    assert f"python -m densessl convert --preset smoke --run {RUN}" in message and "records" in message
    assert not cfg.released_lock.exists()

    # placed: the first use records it (by path), a replaced file is refused and left where it is
    target.parent.mkdir()
    reference = _official_dino_file(target)
    model, meta = load_backbone(run_convert(cfg, RUN))
    entry = rel.read_lock(cfg.released_lock)[RUN]
    assert entry["path"] == str(target) and entry["sha256"] == _sha(target) and "url" not in entry
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), reference.forward_features(x))
    torch.manual_seed(9)
    _official_dino_file(target)
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=f"{target} has sha256 .*the file changed since"):
        run_convert(cfg, RUN)
    assert target.is_file()


def test_a_record_for_another_source_is_not_reused(tmp_path):
    lock = tmp_path / "lock.yaml"
    file = tmp_path / "w.pth"
    file.write_bytes(b"weights")
    rel.record(lock, RUN, {"url": "http://127.0.0.1:9/old.pth"}, file)
    with pytest.raises(CheckpointError, match="delete that entry .* to record the new source"):
        rel.obtain({"path": str(file), "sha256": "record"}, RUN, tmp_path / "dl", lock, "paper")


def test_concurrent_records_keep_every_entry_and_a_failed_write_keeps_the_file(tmp_path, monkeypatch):
    lock = tmp_path / "released.lock.yaml"
    files = []
    for i in range(8):
        files.append(tmp_path / f"w{i}.pth")
        files[-1].write_bytes(bytes([i]) * 100)
    threads = [threading.Thread(target=rel.record, args=(lock, f"m/r{i}", {"path": str(f)}, f))
               for i, f in enumerate(files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = rel.read_lock(lock)
    assert sorted(entries) == [f"m/r{i}" for i in range(8)]
    assert all(entries[f"m/r{i}"]["sha256"] == _sha(f) for i, f in enumerate(files))
    # a second record of the same run keeps the first entry (another job recorded it first)
    assert rel.record(lock, "m/r0", {"path": str(files[1])}, files[1])["sha256"] == _sha(files[0])

    before = lock.read_bytes()

    def torn(path, text):  # the write fails half-way: the atomic rename never happens
        with atomic_path(path) as tmp:
            tmp.write_text(text[: len(text) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(rel, "write_text", torn)
    with pytest.raises(OSError, match="No space left"):
        rel.record(lock, "m/new", {"path": str(files[0])}, files[0])
    assert lock.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".released")) == []


def test_released_evaluations_must_be_protocols(tmp_path):
    with pytest.raises(ConfigError, match=r"released.0.evaluations: \['davis'\] are not protocols"):
        _cfg(tmp_path, {"url": "http://127.0.0.1:9/x.pth", "evaluations": ["davis"]})
    with pytest.raises(ConfigError, match="released.0.sha256"):
        _cfg(tmp_path, {"url": "http://127.0.0.1:9/x.pth", "sha256": "recorded"})


# ------------------------------------------------------------------------------- importer layouts of the releases


def test_dino_resnet50_and_densecl_files_import_through_state_dict(tmp_path):
    """DINO's ResNet-50 (hubconf.py dino_resnet50: torchvision keys, loaded with fc = Identity) and DenseCL's
    extracted backbone ({state_dict, author}, tools/extract_backbone_weights.py) load strictly as torchvision's
    ResNet-50, key for key."""
    torch.manual_seed(0)
    reference = clove_target_resnet50().eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    dino = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, dino)
    densecl = tmp_path / "densecl_r50_imagenet_200ep.pth"
    torch.save({"state_dict": state, "author": "DenseCL"}, densecl)
    x = torch.randn(1, 3, 64, 64)
    for path, options in ((dino, {"drop": ["fc."]}), (densecl, {"checkpoint_key": "state_dict"})):
        model = import_checkpoint("state_dict", path, "resnet50", layout="torchvision_resnet", **options)
        assert model.state_dict().keys() == reference.state_dict().keys()
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[fc.weight, fc.bias\]"):
        import_checkpoint("state_dict", dino, "resnet50", layout="torchvision_resnet")


# ------------------------------------------------------------------------------------------- the paper preset


def test_paper_releases_record_their_checksums_and_run_only_their_tables_protocols():
    from densessl.report.cells import cell_provenance, release_checksum
    from densessl.report.paper_tables import plan

    cfg = load_config([REPO / "config.yaml"], preset="paper", root=REPO, check_settings=False)
    releases = cfg.released_runs
    assert len(releases) == 14
    for run in releases:
        spec = cfg.released_spec(run)
        assert spec["sha256"] == "record" and (spec.get("url") or spec.get("page")), run.id
        assert release_checksum(cfg, run) == "checksum recorded on first download (released.lock.yaml)"
        prov = cell_provenance(run, {"provenance": {"inputs": {"backbone_sha256": "be" * 32}}}, "m.json", cfg)
        assert prov["release_checksum"] == release_checksum(cfg, run) and prov["checkpoint_sha256"] == "be" * 32
    own = next(r for r in cfg.method_runs)
    assert "release_checksum" not in cell_provenance(own, {}, "m.json", cfg)
    assert cfg.released_lock == REPO / "workflow" / "released.lock.yaml"
    needed: dict[str, set[str]] = {}
    for c in plan(cfg):
        for job in c.jobs:
            if job.run.released:
                needed.setdefault(job.run.id, set()).add(job.protocol)
    jobs = {(p, r.id) for p, r in cfg.evaluation_jobs() if r.released}
    assert jobs == {(p, r) for r, ps in needed.items() for p in ps}  # every release job fills a published cell
    assert set(needed) == {r.id for r in releases}
    manual = {r.id: cfg.released_spec(r)["page"] for r in releases if cfg.released_spec(r).get("path")}
    assert set(manual) == {"pixpro/resnet50-imagenet-100ep-released", "pixpro/resnet50-imagenet-400ep-released",
                           "slotcon/resnet50-imagenet-200ep-released"}
    assert all(page.startswith(("https://drive.google.com/", "https://connecthkuhk-my.sharepoint.com/"))
               for page in manual.values())
