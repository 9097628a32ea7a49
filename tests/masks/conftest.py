"""Fixtures of the mask tests."""

from __future__ import annotations

import pytest
import torch

from tests.masks.helpers import load_cells


@pytest.fixture(scope="module")
def cells() -> dict[str, torch.Tensor]:
    """The first few images of each class, (N, 3, 64, 64)."""
    return load_cells()
