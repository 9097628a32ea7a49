"""The decode-once cache (celldiff.data.imagecache): messy folders, pools, keys, stale files, cache folders."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import celldiff.data.imagecache as cache_module
from celldiff.data.datamodule import CellDataModule
from celldiff.data.imagecache import build_cache, cache_key, load_cache
from celldiff.data.scan import scan_dataset
from celldiff.errors import CellDataWarning, DataError
from tests.data.helpers import (
    bmp_folder,
    copy_sample,
    one_line,
    png_bytes,
    real_jpegs,
    record_data_warnings,
    rewrite_keeping_size_and_mtime,
)

# Bad and unusual files planted next to real JPEGs; expected reasons for the unusable ones.
UNUSABLE = {
    "basophil/x.jpg": "not an image",
    "basophil/half.jpg": "truncated JPEG",
    "eosinophil/zero.jpg": "empty file",
}


@pytest.fixture
def messy_dir(pbc_sample, tmp_path) -> Path:
    root = copy_sample(pbc_sample, tmp_path / "messy", 2, ["basophil", "eosinophil", "neutrophil"])
    real = real_jpegs(pbc_sample, "lymphocyte", 1)[0].read_bytes()
    (root / "basophil" / "x.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(4000))  # a .DS_Store
    (root / "basophil" / "half.jpg").write_bytes(real[: len(real) // 2])
    (root / "eosinophil" / "zero.jpg").write_bytes(b"")
    (root / "eosinophil" / "grey.png").write_bytes(png_bytes(Image.new("L", (60, 70), 100)))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent black
    (root / "eosinophil" / "rgba.png").write_bytes(png_bytes(rgba))
    (root / "neutrophil" / "cmyk.JPG").write_bytes(png_bytes(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG"))
    deep = Image.fromarray(np.full((30, 30), 32896, dtype=np.uint16))  # mode I;16, 32896 / 257 = 128
    assert deep.mode == "I;16"
    (root / "neutrophil" / "deep.png").write_bytes(png_bytes(deep))
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    (root / "neutrophil" / "palette.png").write_bytes(png_bytes(palette))
    (root / "neutrophil" / "odd.bmp").write_bytes(png_bytes(Image.new("RGB", (50, 80), (1, 2, 3)), "BMP"))
    (root / "basophil" / "scan.tiff").write_bytes(png_bytes(Image.new("RGB", (33, 33), (9, 99, 199)), "TIFF"))
    (root / "monocyte").mkdir()  # empty class folder
    (root / "basophil" / "README.txt").write_text("stray")
    (root / "basophil" / "._BA_1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "MANIFEST.sha256").write_text("")
    (root / "__MACOSX" / "basophil").mkdir(parents=True)
    (root / "__MACOSX" / "basophil" / "._x.jpg").write_bytes(b"junk")
    return root


def test_messy_folder_loads_every_usable_image_and_names_the_rest_once(messy_dir, tmp_path):
    scan = scan_dataset(messy_dir)
    assert scan.class_names == ("basophil", "eosinophil", "neutrophil")
    assert scan.empty_classes == ("monocyte",)
    assert len(scan.relpaths) == 6 + 3 + 7  # README, ._*, __MACOSX and MANIFEST are not listed
    data, messages = record_data_warnings(lambda: build_cache(scan, 32, tmp_path / "cache"))
    assert len(messages) == 1
    assert "skipped 3 unusable files" in messages[0] and "monocyte/" in messages[0]
    for rel, reason in UNUSABLE.items():
        assert f"{rel} ({reason})" in messages[0]
    assert sorted(data.skipped) == sorted(UNUSABLE.items())
    assert data.images.shape == (13, 32, 32, 3) and data.images.dtype == np.uint8
    for rel, label in zip(data.relpaths, data.labels, strict=True):
        assert data.class_names[label] == rel.split("/")[0]
    pixels = {rel: np.asarray(data.images[i], dtype=int) for i, rel in enumerate(data.relpaths)}
    assert (pixels["eosinophil/grey.png"] == 100).all()
    assert (pixels["eosinophil/rgba.png"] == 255).all()  # transparent → white background
    assert (pixels["neutrophil/deep.png"] == 128).all()  # 16 bit scaled, not clipped to 255
    assert (pixels["neutrophil/palette.png"] == [10, 200, 30]).all()
    assert (pixels["neutrophil/odd.bmp"] == [1, 2, 3]).all()
    assert (pixels["basophil/scan.tiff"] == [9, 99, 199]).all()
    assert np.abs(pixels["neutrophil/cmyk.JPG"] - [255, 0, 0]).max() <= 8  # lossy JPEG of pure red
    real = [p for p in data.relpaths if p.split("/")[1][:2] in ("BA", "EO", "BN", "SN")]
    assert len(real) == 6 and all(20 < pixels[p].mean() < 250 for p in real)


def test_later_runs_read_the_cache_and_repeat_the_summary(messy_dir, tmp_path):
    scan = scan_dataset(messy_dir)
    with pytest.warns(CellDataWarning):
        built = build_cache(scan, 16, tmp_path)
    loaded, messages = record_data_warnings(lambda: load_cache(scan, 16, tmp_path))
    assert len(messages) == 1 and "skipped 3 unusable files" in messages[0]
    np.testing.assert_array_equal(loaded.images, built.images)
    assert isinstance(loaded.images, np.memmap) and loaded.relpaths == built.relpaths


@pytest.mark.parametrize("small_files", [False, True], ids=["originals-threads", "64px-processes"])
def test_pool_build_equals_serial_build(pbc_sample, tmp_path, monkeypatch, small_files):
    root = copy_sample(pbc_sample, tmp_path / "d", 16)  # 128 images: 2 workers at 64 images per worker
    if small_files:  # like pbc64: small JPEGs are decoded in processes
        for f in root.rglob("*.jpg"):
            with Image.open(f) as image:
                image.resize((64, 64)).save(f, quality=90)
    pools = []
    make_pool = cache_module._make_pool
    monkeypatch.setattr(cache_module, "_make_pool", lambda *a: pools.append(make_pool(*a)) or pools[-1])
    scan = scan_dataset(root)
    serial = build_cache(scan, 16, tmp_path / "serial", workers=1)
    pooled = build_cache(scan, 16, tmp_path / "pooled", workers=2)
    assert [type(p).__name__ for p in pools] == ["ProcessPoolExecutor" if small_files else "ThreadPoolExecutor"]
    np.testing.assert_array_equal(serial.images, pooled.images)
    assert serial.sha256 == pooled.sha256 and serial.relpaths == pooled.relpaths


def test_only_unusable_images_is_a_data_error(tmp_path):
    (tmp_path / "d" / "basophil").mkdir(parents=True)
    (tmp_path / "d" / "basophil" / "a.jpg").write_bytes(b"")
    (tmp_path / "d" / "basophil" / "b.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="no usable image") as error:
        build_cache(scan_dataset(tmp_path / "d"), 16, tmp_path / "cache")
    assert str(tmp_path / "d") in str(error.value)
    assert not list((tmp_path / "cache").glob("*"))  # no half-written cache left behind


def test_cache_key_follows_mtime_and_image_size(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 1)
    key = cache_key(scan_dataset(root), 64)
    assert cache_key(scan_dataset(root), 64) == key
    assert cache_key(scan_dataset(root), 32) != key
    assert cache_key(scan_dataset(root, classes=["ig"]), 64) != key
    touched = next(root.glob("ig/*.jpg"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert cache_key(scan_dataset(root), 64) != key


# ------------------------------------------------------------------------------ stale cache


def test_a_file_rewritten_with_the_same_size_and_mtime_rebuilds_the_cache(tmp_path, caplog):
    root = bmp_folder(tmp_path / "d")
    args = dict(data_dir=str(root), image_size=8, batch_size=2, cache_dir=str(tmp_path / "c"), augment=False)
    first = CellDataModule(**args)
    first.prepare_data()
    first.setup("fit")
    old_digest = first.cached.sha256[first.cached.relpaths.index("ig/1.bmp")]
    rewrite_keeping_size_and_mtime(root / "ig" / "1.bmp", (250, 0, 0))

    second = CellDataModule(**args)
    with pytest.warns(CellDataWarning, match=r"1 file of .* changed since the cache .* \(ig/1.bmp\); rebuilding it"):
        second.prepare_data()
    second.setup("fit")
    row = second.cached.relpaths.index("ig/1.bmp")
    assert (np.asarray(second.cached.images[row]) == [250, 0, 0]).all()  # the new pixels, not the stale ones
    assert second.cached.sha256[row] != old_digest

    # Unchanged now: reused, every file re-hashed, and the log says which cache and key matched.
    third = CellDataModule(**args)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error", CellDataWarning)
        third.prepare_data()
        third.setup("fit")
    assert third.cached.verified == third.cached.num_files == 6
    assert f"reusing the image cache {third.cached.path}" in caplog.text and third.cached.key in caplog.text


def test_load_cache_samples_the_files_of_a_large_data_set(tmp_path, monkeypatch):
    root = bmp_folder(tmp_path / "d", per_class=10)
    scan = scan_dataset(root)
    build_cache(scan, 8, tmp_path / "c")
    monkeypatch.setattr(cache_module, "VERIFY_BYTES", 5 * (root / "ig" / "0.bmp").stat().st_size)
    loaded = load_cache(scan, 8, tmp_path / "c")
    assert loaded is not None and loaded.verified == 5 and loaded.num_files == 20
    for i in range(10):  # every file changed: any sample catches it
        rewrite_keeping_size_and_mtime(root / "ig" / f"{i}.bmp", (1, 2, 3))
    with pytest.warns(CellDataWarning, match="rebuilding"):
        assert load_cache(scan, 8, tmp_path / "c") is None


# ------------------------------------------------------------------------------ cache folder


@pytest.mark.parametrize("where", ["file", "inside-file"])
def test_a_cache_dir_that_is_a_file_is_one_line_and_the_file_is_untouched(tmp_path, where):
    root = bmp_folder(tmp_path / "d")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    cache_dir = blocker if where == "file" else blocker / "cache"
    with pytest.raises(DataError) as error:
        build_cache(scan_dataset(root), 8, cache_dir)
    assert f"cache folder {cache_dir}" in one_line(error) and "not a folder" in str(error.value)
    assert blocker.read_text() == "keep me"


def test_a_full_disk_is_reported_before_decoding(tmp_path, monkeypatch):
    root = bmp_folder(tmp_path / "d")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(DataError, match=r"the image cache needs .* GiB .* but its disk has 0.00 GiB free") as error:
        build_cache(scan_dataset(root), 64, tmp_path / "c")
    one_line(error)
    assert list((tmp_path / "c").iterdir()) == []
