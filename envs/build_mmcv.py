"""Build (once per machine) and install mmcv with its compiled ops for the locked torch.

Why a script: mmcv publishes no wheel for our torch on PyPI, only an sdist, and that sdist does not build as
published against torch 2.14: torch's headers require C++20 while mmcv 2.1.0's ``setup.py`` passes
``-std=c++14``/``-std=c++17`` to the compiler (and nvcc). We fetch the pinned sdist, refuse it unless its
sha256 matches, rewrite those flags to ``-std=c++20``, build a wheel without build isolation against the torch
that is installed (CPU ops on a machine without CUDA, CUDA ops where torch sees CUDA and nvcc exists), keep the
wheel in a cache keyed by (mmcv version, torch version, python tag, CPU/CUDA) so the long compile happens
once per machine, and install it. The build tree lives in the cache folder until its wheel exists, so an
interrupted compile continues where it stopped on the next run. The build needs a setuptools that still ships ``pkg_resources`` (< 81,
because mmcv's ``setup.py`` imports it); the lock pins one.

Usage: ``python envs/build_mmcv.py`` (what ``make env`` runs after the lock install);
``--rebuild`` ignores the cache, ``--print-key`` prints the cache key and exits.
Environment: ``DENSESSL_WHEEL_CACHE`` (cache root, default ``~/.cache/densessl/wheels``),
``DENSESSL_MMCV_SDIST`` (a local path or URL of the same sdist, for machines without internet; still hash
checked), ``DENSESSL_MMCV_CUDA`` (``1``/``0`` forces the CUDA/CPU build), ``MAX_JOBS`` (parallel compile jobs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MMCV_VERSION = "2.1.0"
# The sdist on PyPI (https://pypi.org/project/mmcv/2.1.0/#files) and its published sha256.
SDIST_URL = (
    "https://files.pythonhosted.org/packages/a7/19/"
    "f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz"
)
SDIST_SHA256 = "d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f"
CXX_STD = "c++20"

# -std=c++14 / -std=c++17 (gcc, clang, nvcc) and /std:c++14 / /std:c++17 (MSVC), as literals in setup.py.
_STD_FLAG = re.compile(r"(?P<prefix>-std=|/std:)c\+\+(?:14|17)")


class BuildError(RuntimeError):
    """A failed step of the mmcv build, with the fix in its message (printed as one line)."""


@dataclass(frozen=True)
class Target:
    """What the wheel is built for; two machines with equal targets can share a cached wheel."""

    mmcv_version: str
    torch_version: str
    python_tag: str
    device: str  # "cpu" or "cuda<major.minor>"

    @property
    def key(self) -> str:
        return f"mmcv-{self.mmcv_version}_torch-{self.torch_version}_{self.python_tag}_{self.device}"


def patch_std_flags(setup_py: str, std: str = CXX_STD) -> tuple[str, int]:
    """Rewrite every C++14/C++17 standard flag in mmcv's ``setup.py`` to ``std``; return (text, count).

    Refuses a ``setup.py`` without any such flag: then the pinned sdist is not the file this patch was
    written for, and building it unpatched would fail later with a compiler error far from the cause.
    """
    patched, count = _STD_FLAG.subn(lambda m: f"{m.group('prefix')}{std}", setup_py)
    if count == 0:
        raise BuildError(
            "mmcv setup.py: no -std=c++14/-std=c++17 flag found to patch; the sdist is not mmcv "
            f"{MMCV_VERSION} as pinned in envs/build_mmcv.py (check SDIST_URL/SDIST_SHA256)"
        )
    return patched, count


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None = None) -> None:
    """Refuse (and delete) a download whose hash differs from the pinned one (``SDIST_SHA256`` by default)."""
    expected = expected or SDIST_SHA256
    actual = sha256_of(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise BuildError(
            f"{path.name}: sha256 {actual} does not match the pinned {expected}; refusing to build it "
            "(a different or corrupted file; point DENSESSL_MMCV_SDIST at the original PyPI sdist)"
        )


def choose_device(torch_cuda: str | None, cuda_available: bool, cuda_home: str | None, force: str | None) -> str:
    """``cpu`` or ``cuda<ver>``: CUDA ops need a CUDA torch and nvcc (CUDA_HOME); a visible GPU or
    DENSESSL_MMCV_CUDA=1 asks for them (a GPU-less login node building for the GPU nodes sets the flag)."""
    if force not in (None, "", "0", "1"):
        raise BuildError(f"DENSESSL_MMCV_CUDA={force!r}: use 1 (CUDA ops), 0 (CPU ops) or leave it unset")
    want_cuda = force == "1" or (force in (None, "") and cuda_available)
    if not want_cuda:
        return "cpu"
    if torch_cuda is None:
        raise BuildError("DENSESSL_MMCV_CUDA=1 but the installed torch is a CPU-only build; unset it")
    if cuda_home is None:
        if force == "1":
            raise BuildError(
                "DENSESSL_MMCV_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME to the toolkit "
                f"matching torch's CUDA {torch_cuda}, or DENSESSL_MMCV_CUDA=0 for CPU ops"
            )
        return "cpu"  # a GPU is visible but no nvcc: CPU ops still let every protocol run
    return f"cuda{torch_cuda}"


def cache_root() -> Path:
    return Path(os.environ.get("DENSESSL_WHEEL_CACHE") or Path.home() / ".cache" / "densessl" / "wheels")


def cached_wheel(root: Path, target: Target) -> Path | None:
    wheels = sorted((root / target.key).glob(f"mmcv-{target.mmcv_version}-*.whl"))
    return wheels[-1] if wheels else None


def current_target() -> Target:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # torch guesses CUDA_HOME (e.g. /usr/local) even where no toolkit is installed: only a real nvcc counts
    cuda_home = CUDA_HOME if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file() else None
    device = choose_device(
        torch.version.cuda, torch.cuda.is_available(), cuda_home, os.environ.get("DENSESSL_MMCV_CUDA")
    )
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return Target(MMCV_VERSION, torch.__version__, tag, device)


def fetch_sdist(dest_dir: Path) -> Path:
    source = os.environ.get("DENSESSL_MMCV_SDIST") or SDIST_URL
    dest = dest_dir / f"mmcv-{MMCV_VERSION}.tar.gz"
    if re.match(r"^https?://", source):
        try:
            with urllib.request.urlopen(source, timeout=120) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise BuildError(
                f"download of {source} failed ({exc}); without internet, set DENSESSL_MMCV_SDIST to a local "
                f"copy of mmcv-{MMCV_VERSION}.tar.gz"
            ) from exc
    else:
        if not Path(source).is_file():
            raise BuildError(f"DENSESSL_MMCV_SDIST={source}: no such file")
        shutil.copyfile(source, dest)
    verify_sha256(dest)
    return dest


def check_toolchain() -> None:
    try:
        import pkg_resources  # noqa: F401  (mmcv's setup.py imports it)
    except ImportError as exc:
        import setuptools

        raise BuildError(
            f"setuptools {setuptools.__version__} has no pkg_resources, which mmcv's setup.py imports; "
            "install the locked setuptools (80.9.0): make env"
        ) from exc
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise BuildError("no C++ compiler (c++) on PATH; install g++ (Debian/Ubuntu: apt-get install g++)")


SOURCE_MARKER = ".densessl-patched"


def prepare_source(build_root: Path) -> Path:
    """The patched source tree in ``build_root``: reused when an earlier build left it there (a killed
    build then continues: ninja skips the objects it finished), else fetched, verified, unpacked and patched.

    The tree is only trusted when its marker names the pinned sdist hash, written after the patch."""
    src = build_root / f"mmcv-{MMCV_VERSION}"
    marker = build_root / SOURCE_MARKER
    if marker.is_file() and marker.read_text().strip() == SDIST_SHA256 and (src / "setup.py").is_file():
        print(f"build_mmcv: continuing the build in {src}", flush=True)
        return src
    if build_root.exists():
        shutil.rmtree(build_root)
    build_root.mkdir(parents=True)
    sdist = fetch_sdist(build_root)
    with tarfile.open(sdist) as tar:
        tar.extractall(build_root, filter="data")
    sdist.unlink()
    setup_py = src / "setup.py"
    patched, count = patch_std_flags(setup_py.read_text())
    setup_py.write_text(patched)
    marker.write_text(SDIST_SHA256 + "\n")
    print(f"build_mmcv: patched {count} C++ standard flags to -std={CXX_STD}", flush=True)
    return src


def build_wheel(target: Target, out_dir: Path, build_root: Path) -> Path:
    """Compile the patched sdist in ``build_root`` into a wheel in ``out_dir``; return the wheel path."""
    check_toolchain()
    src = prepare_source(build_root)
    dist = build_root / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    env = dict(os.environ)
    env["MMCV_WITH_OPS"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env["FORCE_CUDA"] = "1" if target.device.startswith("cuda") else "0"
    if not target.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # setup.py asks torch.cuda.is_available() itself
    print(f"build_mmcv: compiling {target.key} with MAX_JOBS={env['MAX_JOBS']} (long: 75 min measured on 2 busy cores)",
          flush=True)
    # pip builds a local folder in place, so the objects of an interrupted attempt stay in src/build
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
           "-w", str(dist), str(src)]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise BuildError("mmcv compile failed (compiler output above); fix the toolchain and rerun make env")
    wheels = list(dist.glob("mmcv-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"mmcv build produced {len(wheels)} wheels in {dist}, expected 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / wheels[0].name
    staging = out_dir / f".{wheels[0].name}.partial"
    shutil.copyfile(wheels[0], staging)
    os.replace(staging, final)  # a killed copy never leaves a wheel that a later run would trust
    shutil.rmtree(build_root)   # the objects (hundreds of MB) are no longer needed once the wheel is cached
    return final


def install_wheel(wheel: Path) -> None:
    uv = Path(sys.executable).parent / "uv"
    if uv.exists():
        cmd = [str(uv), "pip", "install", "--python", sys.executable, "--no-deps", "--reinstall", str(wheel)]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)]
    if subprocess.run(cmd).returncode != 0:
        raise BuildError(f"installing {wheel} failed (output above)")


SMOKE_CHECK = (
    "import torch; from mmcv.ops import RoIAlign, nms; "
    "f = torch.arange(64.).reshape(1, 1, 8, 8); r = torch.tensor([[0., 0., 0., 4., 4.]]); "
    "assert RoIAlign((2, 2), 1.0, 0)(f, r).shape == (1, 1, 2, 2); "
    "b = torch.tensor([[0., 0., 4., 4.], [0., 0., 4., 4.1]]); s = torch.tensor([0.9, 0.8]); "
    "assert nms(b, s, 0.5)[1].tolist() == [0]"
)


def ops_work() -> bool:
    """True when the installed mmcv imports its compiled ops and RoIAlign/NMS run (a fresh interpreter)."""
    return subprocess.run([sys.executable, "-c", SMOKE_CHECK], capture_output=True).returncode == 0


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmcv")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="ignore the cached wheel and compile again")
    parser.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    args = parser.parse_args(argv)
    try:
        target = current_target()
        if args.print_key:
            print(target.key)
            return 0
        if not args.rebuild and installed_version() == MMCV_VERSION and ops_work():
            print(f"build_mmcv: mmcv {MMCV_VERSION} with ops already installed")
            return 0
        root = cache_root()
        wheel = None if args.rebuild else cached_wheel(root, target)
        if wheel is None:
            wheel = build_wheel(target, root / target.key, root / "build" / target.key)
            print(f"build_mmcv: cached {wheel}")
        else:
            print(f"build_mmcv: using cached {wheel}")
        install_wheel(wheel)
        if not ops_work():
            raise BuildError(
                f"mmcv installed from {wheel} but mmcv.ops does not run RoIAlign/NMS; "
                "rebuild it: python envs/build_mmcv.py --rebuild"
            )
        print(f"build_mmcv: mmcv {MMCV_VERSION} ops OK ({target.device})")
        return 0
    except BuildError as exc:
        print(f"build_mmcv: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
