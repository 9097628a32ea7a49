"""The shared image helpers (celldiff.images)."""

from __future__ import annotations

import warnings

import torch
from PIL import Image

from celldiff.images import load_pngs


def test_reading_the_written_pngs_back_gives_writable_tensors(tmp_path):
    """`celldiff predict` read its PNGs through a read-only numpy view: "The given NumPy array is not writable"."""
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = load_pngs([tmp_path / "a.png"])
    assert images.shape == (1, 3, 4, 4) and images.dtype == torch.uint8
