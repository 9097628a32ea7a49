"""The app tests' models (tiny, random weights) and images: loaded once per module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from celldiff.app.inputs import read_upload
from tests.app.helpers import tiny_app_model
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An inpainting, class-conditional tiny model with the PBC class names."""
    return tiny_app_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A tiny model trained for neither inpainting nor classes."""
    return tiny_app_model(tmp_path_factory.mktemp("plain"), inpainting=False, class_conditional=False, num_classes=0,
                          class_names=None)  # fmt: skip


@pytest.fixture(scope="module")
def cell_path() -> Path:
    """A real sample cell (360 x 363 px, not square)."""
    return sorted((SAMPLE / "erythroblast").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def cell(cell_path) -> np.ndarray:
    return read_upload(cell_path)
