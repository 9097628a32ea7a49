"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def pbc_sample() -> Path:
    """The bundled 320-image sample; the shared read-only copy until the repository has one."""
    for candidate in (REPO / "data" / "pbc_sample", Path("/work/shared/data/pbc_sample")):
        if (candidate / "basophil").is_dir():
            return candidate
    pytest.skip("PBC sample not found")
