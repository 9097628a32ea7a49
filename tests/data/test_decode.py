"""Decoding one file (celldiff.data.decode): truncation caught whatever PIL is told, draft decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from celldiff.data.decode import load_image
from celldiff.errors import UnusableImageError
from tests.data.helpers import real_jpegs


def test_truncated_jpeg_detected_even_if_pil_told_to_pad(pbc_sample, monkeypatch):
    real = real_jpegs(pbc_sample, "basophil", 1)[0].read_bytes()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for size in (64, 360):  # with and without draft mode
        with pytest.raises(UnusableImageError, match="truncated JPEG"):
            load_image(real[: len(real) // 2], size)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_draft_decoding_sizes_and_quality(pbc_sample):
    path = real_jpegs(pbc_sample, "monocyte", 1)[0]
    with Image.open(path) as image:
        assert image.size == (360, 363)
        full = image.convert("RGB")
    for size in (64, 100, 360, 363):
        out = load_image(path, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
    # Draft (DCT-scaled) decoding stays close to a full-resolution Lanczos reference.
    reference = np.asarray(full.resize((64, 64), Image.Resampling.LANCZOS, box=(0, 1.5, 360, 361.5)), dtype=float)
    assert np.abs(load_image(path.read_bytes(), 64) - reference).mean() < 3.0
    np.testing.assert_array_equal(load_image(path, 360), np.asarray(full)[1:361])  # a plain centre crop
