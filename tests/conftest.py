from __future__ import annotations

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
