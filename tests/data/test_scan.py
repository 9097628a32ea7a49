"""Scanning (celldiff.data.scan): folder, nested folder and zip layouts, bad data_dir values as one line."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

from celldiff.data.datamodule import CellDataModule
from celldiff.data.imagecache import build_cache
from celldiff.data.scan import scan_dataset
from celldiff.errors import DataError
from tests.conftest import SAMPLE
from tests.data.helpers import copy_sample, one_line


def test_nested_and_zip_layouts_give_the_same_arrays(pbc_sample, tmp_path):
    flat = copy_sample(pbc_sample, tmp_path / "flat", 2, ["basophil", "ig", "platelet"])
    nested = tmp_path / "download"
    shutil.copytree(flat, nested / "PBC_dataset_normal_DIB")
    (nested / "README.txt").write_text("readme")
    reference = build_cache(scan_dataset(flat), 24, tmp_path / "c1")

    flat_zip, nested_zip = tmp_path / "flat.zip", tmp_path / "nested.zip"
    for archive_path, prefix in ((flat_zip, ""), (nested_zip, "PBC_dataset_normal_DIB/")):
        with zipfile.ZipFile(archive_path, "w") as archive:
            archive.writestr(f"__MACOSX/{prefix}basophil/._junk.jpg", b"junk")
            archive.writestr(f"{prefix}ig/", b"")  # explicit folder entry
            for f in sorted(flat.rglob("*.jpg")):
                archive.write(f, prefix + f.relative_to(flat).as_posix())
    for source in (nested, flat_zip, nested_zip):
        scan = scan_dataset(source)
        assert scan.prefix == ("" if source == flat_zip else "PBC_dataset_normal_DIB/")
        data = build_cache(scan, 24, tmp_path / "c2")
        assert data.relpaths == reference.relpaths and data.class_names == reference.class_names
        np.testing.assert_array_equal(data.images, reference.images)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "nope", "does not exist"),
        (lambda tmp: tmp, "holds no class folders"),
        (lambda tmp: tmp / "notes.txt", "neither a folder nor a .zip"),
    ],
    ids=["missing", "no-class-folders", "plain-file"],
)
def test_bad_data_dir_raises_one_line_data_error(tmp_path, make, expected):
    (tmp_path / "notes.txt").write_text("not a dataset")
    (tmp_path / "basophil").mkdir()
    (tmp_path / "basophil" / "README.md").write_text("no images here")
    data_dir = make(tmp_path)
    with pytest.raises(DataError) as error:
        scan_dataset(data_dir)
    message = str(error.value)
    assert expected in message and str(data_dir) in message and "\n" not in message


def test_class_subset_and_unknown_class(pbc_sample, tmp_path):
    scan = scan_dataset(pbc_sample, classes=["platelet", "basophil"])
    assert scan.class_names == ("basophil", "platelet")
    assert set(scan.labels) == {0, 1} and len(scan.relpaths) == 80
    with pytest.raises(DataError, match="unknown class 'macrophage'.*valid: basophil, eosinophil"):
        scan_dataset(pbc_sample, classes=["basophil", "macrophage"])
    dm = CellDataModule(str(pbc_sample), classes=["platelet", "basophil"], cache_dir=str(tmp_path))
    assert dm.class_names == ["basophil", "platelet"] and dm.num_classes == 2


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
