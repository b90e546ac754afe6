from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sigterm_guard() -> Iterator[None]:
    """A SIGTERM that the code under test fails to catch must fail the test, not kill the test session."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


@pytest.fixture
def random_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")) for _ in range(16)]


# ---------------------------------------------------------------- fault tests (tests/faults_project.py)
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/smoke/data of a project whose ImageNet stage ran once (copied into each test's project)."""
    import faults_project

    folder = tmp_path_factory.mktemp("faults-data")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("DENSESSL_ROOT", str(REPO))
        assert faults_project.cli(faults_project.write_config(folder), "data", "--dataset", "imagenet") == 0
    return folder / "results" / "smoke" / "data"


@pytest.fixture
def project(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with the data stage done and config.yaml written (edit it with write_config)."""
    import faults_project

    monkeypatch.setenv("DENSESSL_ROOT", str(REPO))
    monkeypatch.delenv("DENSESSL_RESUME", raising=False)
    shutil.copytree(tiny_data, tmp_path / "results" / "smoke" / "data")
    faults_project.write_config(tmp_path)
    return tmp_path
