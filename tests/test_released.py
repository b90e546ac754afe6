"""Eval-only track from released weights: download (loopback HTTP), checksum, import, export, DAG targets."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from densessl.checkpoints.io import load_backbone
from densessl.config import load_config
from densessl.data.download import fetch
from densessl.errors import DataError
from densessl.models.backbones import create_backbone
from densessl.stages.convert import run_convert


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support (http.server has none), counting requests."""

    requests: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.headers.get("Range") or "")
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        spec = self.headers.get("Range")
        if spec:
            start = int(spec.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_resumes_a_partial_download_and_checks_the_sum(server, tmp_path):
    root, base = server
    payload = bytes(range(256)) * 4096
    (root / "w.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "w.bin"
    dest.parent.mkdir()
    (dest.parent / "w.bin.part").write_bytes(payload[:100_000])  # an interrupted earlier transfer
    fetch(f"{base}/w.bin", dest, _sha(payload), progress=False)
    assert dest.read_bytes() == payload
    assert _RangeHandler.requests == ["bytes=100000-"]
    assert not (dest.parent / "w.bin.part").exists()
    fetch(f"{base}/w.bin", dest, _sha(payload), progress=False)  # present and verified: no request
    assert len(_RangeHandler.requests) == 1


def test_fetch_rejects_a_wrong_checksum_and_leaves_no_file(server, tmp_path):
    root, base = server
    (root / "w.bin").write_bytes(b"not the release")
    dest = tmp_path / "w.bin"
    with pytest.raises(DataError, match="SHA-256 of the download"):
        fetch(f"{base}/w.bin", dest, "0" * 64, progress=False)
    assert not dest.exists() and not dest.with_name("w.bin.part").exists()
    with pytest.raises(DataError, match="HTTP 404"):
        fetch(f"{base}/missing.bin", tmp_path / "m.bin", "0" * 64, progress=False)


def _official_dino_file(path: Path) -> torch.nn.Module:
    """A checkpoint in the layout of DINO's released training checkpoints (teacher dict, backbone. prefix,
    a head that the importer must drop)."""
    torch.manual_seed(3)
    reference = create_backbone("vit-tiny-p8")
    teacher = {f"backbone.{k}": v.clone() for k, v in reference.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(16, 1)
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 100}, path)
    return reference.eval()


def _config(tmp_path: Path, released: dict) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "released": [released]}))
    return cfg


@pytest.mark.parametrize("how", ["path", "url"])
def test_released_checkpoint_becomes_an_evaluated_row(server, tmp_path, how):
    root, base = server
    file = root / "dino_official.pth"
    reference = _official_dino_file(file)
    spec = {"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet", "format": "dino"}
    if how == "path":
        spec["path"] = str(file)
    else:
        spec.update(url=f"{base}/dino_official.pth", sha256=_sha(file.read_bytes()))
    cfg = load_config([_config(tmp_path, spec)], root=REPO)
    run = cfg.run("dino/vit-tiny-p8-imagenet-released")
    assert run.released and run in cfg.all_runs
    # every evaluation of the configuration runs on it, and its random-init baselines exist
    assert {cfg.eval_metrics(p, run) for p in cfg.evaluations} <= set(
        cfg.eval_metrics(p, r) for p in cfg.evaluations for r in cfg.all_runs)
    assert any(r.is_random_init and r.arch == "vit-tiny-p8" for r in cfg.all_runs)
    out = run_convert(cfg, run.id)
    model, meta = load_backbone(out)
    assert meta["source"]["kind"] == "released" and meta["source"]["file_sha256"] == _sha(file.read_bytes())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), reference.forward_features(x))
    if how == "url":
        assert (tmp_path / "results/smoke/downloads/dino_official.pth").is_file()


def test_released_entry_needs_a_path_or_a_checksummed_url(tmp_path):
    from densessl.errors import ConfigError

    bad = _config(tmp_path, {"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet", "format": "dino",
                             "url": "http://127.0.0.1:9/x.pth"})
    with pytest.raises(ConfigError, match="released.0"):
        load_config([bad], root=REPO)


def test_report_labels_released_rows():
    from densessl.config import Run
    from densessl.report.build import display

    assert display(Run("dino", "vit-s16", "imagenet", released=True))[0] == "DINO (released weights)"


def test_a_compared_methods_release_converts_through_the_state_dict_format(tmp_path):
    """A compared method's file (here a MoCo-v2-style {state_dict: module.encoder_q.*}) becomes an evaluated row
    named by its stated epochs, with the standard network (no method variant)."""
    torch.manual_seed(5)
    reference = create_backbone("vit-tiny-p8").eval()
    file = tmp_path / "mocov2_800ep.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v.clone() for k, v in reference.state_dict().items()}}, file)
    spec = {"method": "mocov2", "arch": "vit-tiny-p8", "data": "imagenet", "epochs": 800, "format": "state_dict",
            "path": str(file), "options": {"layout": "timm_vit", "checkpoint_key": "state_dict",
                                           "prefix": "module.encoder_q."}}
    cfg = load_config([_config(tmp_path, spec)], root=REPO)
    run = cfg.run("mocov2/vit-tiny-p8-imagenet-800ep-released")
    assert run.role == "released" and cfg.variant_of(run) is None
    model, meta = load_backbone(run_convert(cfg, run.id))
    assert meta["source"]["format"] == "state_dict"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), reference.forward_features(x))
