"""envs/build_mmcv.py: the pure parts of the mmcv build (flag patching, cache key, device choice, hash refusal).

The compile itself (about 15 minutes on 2 cores) runs in `make env`; `densessl doctor` then checks its ops.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bm():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("build_mmcv", REPO / "envs" / "build_mmcv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_mmcv"] = module
    spec.loader.exec_module(module)
    return module


# The flag lines of mmcv 2.1.0's setup.py, as published (pytorch, parrots and nvcc branches).
SETUP_EXCERPT = """
            'nvcc': [cuda_args, '-std=c++14'] if cuda_args else ['-std=c++14'],
            'cxx': ['-std=c++14'],
                extra_compile_args['cxx'] = ['-std=c++14']
                extra_compile_args['cxx'] = ['-std=c++17']
                extra_compile_args['cxx'] = ['/std:c++14']
                extra_compile_args['cxx'] = ['/std:c++17']
            extra_compile_args['cxx'] = ['-Wall', '-std=c++17']
                extra_compile_args['nvcc'] += ['-std=c++14']
                extra_compile_args['nvcc'] += ['-std=c++17']
    # c++14 features, the argument ['std=c++14'] must be added here.
"""


def test_patch_rewrites_every_standard_flag(bm) -> None:  # noqa: ANN001
    patched, count = bm.patch_std_flags(SETUP_EXCERPT)
    assert count == 10
    assert "c++14'" not in patched.replace("['std=c++14']", "") and "c++17" not in patched
    assert patched.count("-std=c++20") == 8 and patched.count("/std:c++20") == 2
    # the comment's flag-less "std=c++14" is prose, not a compiler flag: left alone
    assert "['std=c++14'] must be added" in patched


def test_patch_refuses_a_setup_without_flags(bm) -> None:  # noqa: ANN001
    with pytest.raises(bm.BuildError, match="no -std=c\\+\\+14/-std=c\\+\\+17 flag found"):
        bm.patch_std_flags("from setuptools import setup\nsetup(name='mmcv')\n")


def test_cache_key_separates_what_the_wheel_depends_on(bm) -> None:  # noqa: ANN001
    base = bm.Target("2.1.0", "2.14.1+cu130", "cp311", "cpu")
    assert base.key == "mmcv-2.1.0_torch-2.14.1+cu130_cp311_cpu"
    others = [bm.Target("2.2.0", "2.14.1+cu130", "cp311", "cpu"), bm.Target("2.1.0", "2.13.0", "cp311", "cpu"),
              bm.Target("2.1.0", "2.14.1+cu130", "cp312", "cpu"), bm.Target("2.1.0", "2.14.1+cu130", "cp311", "cuda13.0")]
    assert len({base.key, *(t.key for t in others)}) == 5


def test_cached_wheel_is_found_under_its_key(bm, tmp_path: Path) -> None:  # noqa: ANN001
    target = bm.Target("2.1.0", "2.14.1", "cp311", "cpu")
    assert bm.cached_wheel(tmp_path, target) is None
    (tmp_path / target.key).mkdir()
    (tmp_path / target.key / ".mmcv-2.1.0-cp311-cp311-linux_x86_64.whl.partial").write_bytes(b"half")
    assert bm.cached_wheel(tmp_path, target) is None  # an interrupted copy is never taken for a wheel
    wheel = tmp_path / target.key / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"x")
    assert bm.cached_wheel(tmp_path, target) == wheel
    other = bm.Target("2.1.0", "2.13.0", "cp311", "cpu")
    assert bm.cached_wheel(tmp_path, other) is None


def test_cache_root_follows_the_environment(bm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    monkeypatch.setenv("DENSESSL_WHEEL_CACHE", str(tmp_path))
    assert bm.cache_root() == tmp_path
    monkeypatch.delenv("DENSESSL_WHEEL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bm.cache_root() == tmp_path / ".cache" / "densessl" / "wheels"


def test_device_choice(bm) -> None:  # noqa: ANN001
    choose = bm.choose_device
    assert choose("13.0", False, "/usr/local/cuda", None) == "cpu"       # no GPU visible
    assert choose("13.0", True, "/usr/local/cuda", None) == "cuda13.0"   # GPU + nvcc
    assert choose("13.0", True, None, None) == "cpu"                     # GPU but no toolkit: CPU ops
    assert choose("13.0", False, "/usr/local/cuda", "1") == "cuda13.0"   # GPU-less login node building for GPUs
    assert choose("13.0", True, "/usr/local/cuda", "0") == "cpu"
    assert choose(None, False, None, None) == "cpu"
    with pytest.raises(bm.BuildError, match="no CUDA toolkit"):
        choose("13.0", False, None, "1")
    with pytest.raises(bm.BuildError, match="CPU-only build"):
        choose(None, False, None, "1")
    with pytest.raises(bm.BuildError, match="use 1"):
        choose("13.0", False, None, "yes")


def test_hash_mismatch_is_refused_and_deleted(bm, tmp_path: Path) -> None:  # noqa: ANN001
    bad = tmp_path / "mmcv-2.1.0.tar.gz"
    bad.write_bytes(b"not the sdist")
    with pytest.raises(bm.BuildError, match="does not match the pinned"):
        bm.verify_sha256(bad)
    assert not bad.exists()
    good = tmp_path / "good.tar.gz"
    good.write_bytes(b"payload")
    bm.verify_sha256(good, hashlib.sha256(b"payload").hexdigest())
    assert good.exists()


def test_fetch_refuses_a_local_sdist_with_another_hash(bm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    fake = tmp_path / "mmcv-2.1.0.tar.gz"
    fake.write_bytes(b"tampered")
    monkeypatch.setenv("DENSESSL_MMCV_SDIST", str(fake))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(bm.BuildError, match="refusing to build it"):
        bm.fetch_sdist(dest)
    assert not any(dest.iterdir()) and fake.exists()  # the user's file is left alone, our copy removed
    monkeypatch.setenv("DENSESSL_MMCV_SDIST", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(bm.BuildError, match="no such file"):
        bm.fetch_sdist(dest)


def _fake_sdist(tmp_path: Path, bm) -> tuple[Path, str]:  # noqa: ANN001
    import io
    import tarfile

    path = tmp_path / "fake-mmcv.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = SETUP_EXCERPT.encode()
        info = tarfile.TarInfo(f"mmcv-{bm.MMCV_VERSION}/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_source_is_patched_once_and_an_interrupted_build_continues(bm, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    sdist, digest = _fake_sdist(tmp_path, bm)
    monkeypatch.setattr(bm, "SDIST_SHA256", digest)
    monkeypatch.setenv("DENSESSL_MMCV_SDIST", str(sdist))
    root = tmp_path / "build"
    src = bm.prepare_source(root)
    assert "-std=c++20" in (src / "setup.py").read_text() and "c++17" not in (src / "setup.py").read_text()
    (src / "build").mkdir()
    (src / "build" / "done.o").write_bytes(b"object")  # what a killed compile leaves behind
    assert bm.prepare_source(root) == src and (src / "build" / "done.o").is_file()
    monkeypatch.setattr(bm, "SDIST_SHA256", "0" * 64)  # another pinned sdist: the old tree is not reused
    with pytest.raises(bm.BuildError, match="does not match the pinned"):
        bm.prepare_source(root)
    assert not (src / "build" / "done.o").exists()


def test_main_reports_build_errors_in_one_line(bm, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:  # noqa: ANN001
    monkeypatch.setattr(bm, "installed_version", lambda: None)
    monkeypatch.setenv("DENSESSL_WHEEL_CACHE", str(tmp_path))
    fake = tmp_path / "mmcv-2.1.0.tar.gz"
    fake.write_bytes(b"tampered")
    monkeypatch.setenv("DENSESSL_MMCV_SDIST", str(fake))
    monkeypatch.setattr(bm, "check_toolchain", lambda: None)
    assert bm.main([]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("build_mmcv")]
    assert len(ours) == 1 and ours[0].startswith("build_mmcv: error:") and "sha256" in ours[0]
