"""Bad data inputs get one clear DataError line, and a stale cache is caught (issue 13.4 and the data rows of 13)."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import celldiff.imagecache as cache_module
from celldiff.data import (
    CellDataModule,
    CellDataWarning,
    DataError,
    MaskAssigner,
    build_cache,
    load_cache,
    scan_dataset,
)
from tests.conftest import SAMPLE


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


# ------------------------------------------------------------------------------ data_dir


def test_a_truncated_zip_is_called_truncated(tmp_path):
    archive = tmp_path / "PBC_dataset_normal_DIB.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((SAMPLE / "basophil").glob("*.jpg"))[:3]:
            z.write(f, f"basophil/{f.name}")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # an interrupted download
    with pytest.raises(DataError) as error:
        scan_dataset(archive)
    assert "is a corrupt or truncated zip file" in one_line(error) and str(archive) in str(error.value)
    assert "neither a folder" not in str(error.value)


def test_images_directly_in_data_dir_get_a_hint(tmp_path):
    shutil.copy(next((SAMPLE / "basophil").glob("*.jpg")), tmp_path / "a.jpg")
    with pytest.raises(DataError, match="its images lie directly in it: point data_dir at the folder above it"):
        scan_dataset(tmp_path)


# ------------------------------------------------------------------------------ datamodule arguments


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(image_size=100_000), "image_size=100000 is too large: expected at most 4096"),
        (dict(image_size=0), "expected image_size, batch_size ≥ 1"),
        (dict(batch_size=0), "expected image_size, batch_size ≥ 1"),
        (dict(predict_batch_size=-1), "predict_batch_size=-1: expected ≥ 1"),
        (dict(num_predict_samples=0), "num_predict_samples=0: expected ≥ 1, or -1"),
        (dict(num_predict_samples=-5), "num_predict_samples=-5: expected ≥ 1, or -1"),
        (dict(split_fractions=(float("nan"), 0.5, 0.5)), "split_fractions .* are invalid"),
        (dict(split_fractions=("a", "b", "c")), "split_fractions .* are invalid"),
        (dict(masks="boxx"), r"data.masks 'boxx': unknown mask type\(s\) \['boxx'\]"),
        (dict(masks=""), "data.masks '' names no mask type; expected one or more of box, brush"),
        (dict(masks={"box": "a"}), "data.masks {'box': 'a'}"),
        (
            dict(masks="box", mask_options={"box": {"num_boxs": [1, 2]}}),
            r"unknown option\(s\) \['num_boxs'\] for mask type 'box'",
        ),
        (dict(masks="box", mask_options={"box": 3}), "data.mask_options {'box': 3}: expected options per mask type"),
        (dict(masks="box", mask_options={"box": {"num_boxes": "a"}}), "data.masks 'box' with data.mask_options"),
        (dict(masks="box", mask_options={"bocks": {}}), r"unknown mask type\(s\) \[.bocks.\]"),
        (dict(predict_images="nope", predict_masks=None), "predict_images and data.predict_masks go together"),
    ],
)
def test_bad_datamodule_arguments_are_one_line(tmp_path, kwargs, expected):
    with pytest.raises(DataError, match=expected) as error:
        CellDataModule(str(SAMPLE), cache_dir=str(tmp_path), **kwargs)
    one_line(error)


def test_missing_predict_folders_say_so(tmp_path):
    from celldiff.user_images import UserImageDataset

    (tmp_path / "masks").mkdir()
    (tmp_path / "img.txt").write_text("")
    with pytest.raises(DataError, match="data.predict_images .*nope does not exist"):
        UserImageDataset(tmp_path / "nope", tmp_path / "masks", 16)
    with pytest.raises(DataError, match="data.predict_images .*img.txt is a file, not a folder"):
        UserImageDataset(tmp_path / "img.txt", tmp_path / "masks", 16)


def test_a_mask_option_value_the_generator_rejects_fails_at_start_up():
    with pytest.raises(DataError, match="data.masks 'brush' with data.mask_options"):
        MaskAssigner("brush", {"brush": {"num_strokes": [5, 1]}})


def test_reading_the_written_pngs_back_gives_writable_tensors(tmp_path):
    """`celldiff predict` read its PNGs through a read-only numpy view: "The given NumPy array is not writable"."""
    from celldiff.callbacks import _load_pngs

    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = _load_pngs([tmp_path / "a.png"])
    assert images.shape == (1, 3, 4, 4) and images.dtype == torch.uint8
