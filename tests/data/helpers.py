"""Shared helpers of the data tests: copies of the bundled sample, planted files, warning capture."""

from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from celldiff.errors import CellDataWarning


def real_jpegs(pbc_sample: Path, cls: str, count: int) -> list[Path]:
    return sorted((pbc_sample / cls).glob("*.jpg"))[:count]


def copy_sample(pbc_sample: Path, root: Path, per_class: int, classes: list[str] | None = None) -> Path:
    for cls in classes or sorted(p.name for p in pbc_sample.iterdir() if p.is_dir()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in real_jpegs(pbc_sample, cls, per_class):
            shutil.copy(f, root / cls / f.name)
    return root


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def record_data_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, CellDataWarning)]


def dihedral(image_hwc: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, as (3, S, S) arrays."""
    chw = image_hwc.transpose(2, 0, 1)
    out = []
    for flipped in (chw, chw[:, :, ::-1]):
        out += [np.rot90(flipped, k, axes=(1, 2)) for k in range(4)]
    return out


def bmp_folder(root: Path, per_class: int = 3) -> Path:
    """Uncompressed BMPs: a file rewritten with other pixels keeps its exact size."""
    for c, name in enumerate(("basophil", "ig")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), (40 * c + 10 * i, 100, 200)).save(root / name / f"{i}.bmp")
    return root


def rewrite_keeping_size_and_mtime(path: Path, colour: tuple[int, int, int]) -> None:
    stat = path.stat()
    Image.new("RGB", (20, 20), colour).save(path, format="BMP")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message
