"""Tests of celldiff.data: scanning, decoding, the uint8 cache, splits, datasets, CellDataModule."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image, ImageFile

import celldiff.data as data_module
import celldiff.imagecache as cache_module
from celldiff.data import (
    CellDataModule,
    CellDataWarning,
    CellImageDataset,
    DataError,
    NoiseDataset,
    Split,
    UnusableImageError,
    build_cache,
    cache_key,
    load_cache,
    load_image,
    load_split,
    make_split,
    save_split,
    scan_dataset,
    split_indices,
    tensor_to_uint8,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pbc_sample() -> Path:
    """The bundled 320-image sample; the shared read-only copy until the repository has one."""
    for candidate in (REPO / "data" / "pbc_sample", Path("/work/shared/data/pbc_sample")):
        if (candidate / "basophil").is_dir():
            return candidate
    pytest.skip("PBC sample not found")


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


def test_only_unusable_images_is_a_data_error(tmp_path):
    (tmp_path / "d" / "basophil").mkdir(parents=True)
    (tmp_path / "d" / "basophil" / "a.jpg").write_bytes(b"")
    (tmp_path / "d" / "basophil" / "b.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="no usable image") as error:
        build_cache(scan_dataset(tmp_path / "d"), 16, tmp_path / "cache")
    assert str(tmp_path / "d") in str(error.value)
    assert not list((tmp_path / "cache").glob("*"))  # no half-written cache left behind


def test_class_subset_and_unknown_class(pbc_sample, tmp_path):
    scan = scan_dataset(pbc_sample, classes=["platelet", "basophil"])
    assert scan.class_names == ("basophil", "platelet")
    assert set(scan.labels) == {0, 1} and len(scan.relpaths) == 80
    with pytest.raises(DataError, match="unknown class 'macrophage'.*valid: basophil, eosinophil"):
        scan_dataset(pbc_sample, classes=["basophil", "macrophage"])
    dm = CellDataModule(str(pbc_sample), classes=["platelet", "basophil"], cache_dir=str(tmp_path))
    assert dm.class_names == ["basophil", "platelet"] and dm.num_classes == 2


def synthetic(per_class: list[int]) -> tuple[list[str], list[int], list[str]]:
    relpaths, labels = [], []
    for label, count in enumerate(per_class):
        relpaths += [f"c{label}/{i:04d}.jpg" for i in range(count)]
        labels += [label] * count
    return relpaths, labels, [f"digest-{p}" for p in relpaths]


def test_split_is_deterministic_and_stratified():
    per_class = [40, 40, 1214, 3329, 1, 2, 7]
    relpaths, labels, digests = synthetic(per_class)
    a = make_split(relpaths, labels, digests, seed=0)
    assert a == make_split(relpaths, labels, digests, seed=0)
    assert a.train != make_split(relpaths, labels, digests, seed=1).train
    assert sorted(a.train + a.val + a.test) == sorted(relpaths)
    for label, count in enumerate(per_class):
        got = [sum(p.startswith(f"c{label}/") for p in part) for part in (a.train, a.val, a.test)]
        for fraction, n in zip((0.7, 0.1, 0.2), got, strict=True):
            # Each file is placed by its own hash: binomial counts, within 4 standard deviations.
            assert abs(n - fraction * count) <= 4 * (count * fraction * (1 - fraction)) ** 0.5 + 1, (label, got)
        assert got[0] >= 1  # even a one-image class trains
    with pytest.raises(DataError, match="split_fractions"):
        make_split(relpaths, labels, digests, fractions=(0.5, 0.5, 0.5))


def test_split_is_stable_when_files_are_added_or_removed():
    # The reviewed defect: removing one file of a 1,000-file class moved 123 of 700 training images.
    relpaths, labels, digests = synthetic([1000, 300])
    before = make_split(relpaths, labels, digests, seed=0)
    where = {p: name for name in ("train", "val", "test") for p in getattr(before, name)}
    for drop in (0, 1, 500, 999, 1100):
        keep = [i for i in range(len(relpaths)) if i != drop]
        after = make_split([relpaths[i] for i in keep], [labels[i] for i in keep], [digests[i] for i in keep], seed=0)
        moved = [p for name in ("train", "val", "test") for p in getattr(after, name) if where[p] != name]
        assert moved == [], (drop, moved[:3])
    grown = make_split(relpaths + ["c0/new.jpg"], labels + [0], digests + ["digest-new"], seed=0)
    moved = [p for name in ("train", "val", "test") for p in getattr(grown, name) if p in where and where[p] != name]
    assert moved == []
    # The placement follows the bytes, not the name: a renamed file stays where it was.
    renamed = make_split(["c0/renamed.jpg"] + relpaths[1:], labels, digests, seed=0)
    assert ("c0/renamed.jpg" in renamed.train) == ("c0/0000.jpg" in before.train)
    # Stratified: the realised class fractions are close to the requested ones.
    n_test = sum(p.startswith("c0/") for p in before.test)
    assert 150 <= n_test <= 250


def test_split_keeps_byte_identical_files_together_and_warns_across_classes():
    relpaths, labels, digests = synthetic([40, 40])
    for i in range(0, 20, 2):
        digests[i + 1] = digests[i]  # ten duplicate pairs inside class 0
    digests[45] = digests[30]  # one pair across classes 0 and 1
    for seed in range(5):
        split, messages = record_data_warnings(lambda seed=seed: make_split(relpaths, labels, digests, seed=seed))
        assert len(messages) == 1 and "c0/0030.jpg = c1/0005.jpg" in messages[0]
        where = {p: name for name in ("train", "val", "test") for p in getattr(split, name)}
        for i in range(0, 20, 2):
            assert where[relpaths[i]] == where[relpaths[i + 1]]
        assert where["c0/0030.jpg"] == where["c1/0005.jpg"]


def test_split_save_load_round_trip_and_validation(tmp_path):
    relpaths, labels, digests = synthetic([10, 10])
    split = make_split(relpaths, labels, digests, seed=3)
    save_split(split, tmp_path / "run" / "split.json")
    payload = json.loads((tmp_path / "run" / "split.json").read_text())
    assert payload["version"] == 2 and payload["method"] == "content-hash" and payload["seed"] == 3 and payload["train"] == split.train
    assert load_split(tmp_path / "run" / "split.json") == split
    train, val, test = split_indices(split, relpaths)
    assert [relpaths[i] for i in train] == split.train and len(train) + len(val) + len(test) == 20
    stale = Split(train=split.train + ["c9/gone.jpg", "c9/gone2.jpg"], val=split.val, test=split.test)
    with pytest.raises(DataError, match=r"lists 2 file\(s\) not among .* first: c9/gone.jpg"):
        split_indices(stale, relpaths)
    (tmp_path / "bad.json").write_text('{"train": 3}')
    with pytest.raises(DataError, match="not a celldiff split"):
        load_split(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "missing.json")


def test_datamodule_split_with_real_duplicates_and_split_file_reuse(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 10, ["basophil", "eosinophil", "neutrophil"])
    eo = real_jpegs(pbc_sample, "eosinophil", 1)[0]
    shutil.copy(eo, root / "neutrophil" / "BNE_copy.jpg")  # the cross-class duplicate of the real data
    shutil.copy(root / "basophil" / real_jpegs(pbc_sample, "basophil", 1)[0].name, root / "basophil" / "BA_copy.jpg")
    dm = CellDataModule(str(root), image_size=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    _, messages = record_data_warnings(lambda: (dm.prepare_data(), dm.setup("fit")))
    assert any(f"eosinophil/{eo.name} = neutrophil/BNE_copy.jpg" in m for m in messages)
    where = {p: name for name in ("train", "val", "test") for p in getattr(dm.split, name)}
    assert where[f"eosinophil/{eo.name}"] == where["neutrophil/BNE_copy.jpg"]
    assert where[f"basophil/{real_jpegs(pbc_sample, 'basophil', 1)[0].name}"] == where["basophil/BA_copy.jpg"]
    dm.save_split(tmp_path / "split.json")
    reuse = CellDataModule(
        str(root), image_size=16, split_seed=99, split_file=str(tmp_path / "split.json"), cache_dir=str(tmp_path / "c")
    )
    reuse.setup("fit")
    assert reuse.split == load_split(tmp_path / "split.json")
    np.testing.assert_array_equal(reuse.datasets["test"].indices, dm.datasets["test"].indices)
    other = copy_sample(pbc_sample, tmp_path / "other", 3, ["basophil"])
    with pytest.raises(DataError, match="not among"):
        CellDataModule(str(other), split_file=str(tmp_path / "split.json"), cache_dir=str(tmp_path / "c")).setup("fit")


def test_second_setup_reads_the_cache_and_decodes_nothing(pbc_sample, tmp_path, monkeypatch):
    root = copy_sample(pbc_sample, tmp_path / "d", 3)
    args = dict(data_dir=str(root), image_size=16, batch_size=8, augment=False, cache_dir=str(tmp_path / "c"))
    first = CellDataModule(**args)
    first.prepare_data()
    first.setup("fit")
    files = sorted((tmp_path / "c").iterdir())
    assert [f.suffix for f in files] == [".json", ".npy"]

    def boom(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(cache_module, "load_image", boom)
    monkeypatch.setattr(PIL.Image, "open", boom)
    second = CellDataModule(**args)
    second.prepare_data()
    second.setup("fit")
    batch = next(iter(second.test_dataloader()))
    expected = np.asarray(first.cached.images)[batch["index"].numpy()].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(batch["image"].numpy(), expected)
    assert sorted((tmp_path / "c").iterdir()) == files


def test_cache_key_follows_mtime_and_image_size(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 1)
    key = cache_key(scan_dataset(root), 64)
    assert cache_key(scan_dataset(root), 64) == key
    assert cache_key(scan_dataset(root), 32) != key
    assert cache_key(scan_dataset(root, classes=["ig"]), 64) != key
    touched = next(root.glob("ig/*.jpg"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert cache_key(scan_dataset(root), 64) != key


def test_augmentation_only_flips_and_rotates(pbc_sample, tmp_path):
    data = build_cache(scan_dataset(copy_sample(pbc_sample, tmp_path / "d", 1)), 16, tmp_path / "c")
    plain = CellImageDataset(data.images, data.labels, augment=False)
    for i in range(len(plain)):
        item = plain[i]
        np.testing.assert_array_equal(item["image"].numpy(), np.asarray(data.images[i]).transpose(2, 0, 1))
        assert item["label"].dtype == torch.long and item["label"].ndim == 0 and item["index"] == i
    augmented = CellImageDataset(data.images, data.labels, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(6):
        batch = augmented.get_batch(np.arange(len(augmented)))
        for i, image in enumerate(batch["image"].numpy()):
            matches = [k for k, t in enumerate(dihedral(np.asarray(data.images[i]))) if np.array_equal(image, t)]
            assert matches, "augmentation must be a symmetry of the square"
            seen.add(matches[0])
    assert seen == set(range(8))


def test_dataset_pickles_without_pixels(pbc_sample, tmp_path):
    data = build_cache(scan_dataset(copy_sample(pbc_sample, tmp_path / "d", 2)), 32, tmp_path / "c")
    dataset = CellImageDataset(data.images, data.labels, [3, 1], augment=False)
    payload = pickle.dumps(dataset)
    assert len(payload) < 4000 < data.images.nbytes  # spawn workers reopen the memmap
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone[0]["image"].numpy(), dataset[0]["image"].numpy())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loaders_give_uint8_batches_and_device_hook_scales(pbc_sample, tmp_path, num_workers):
    root = copy_sample(pbc_sample, tmp_path / "d", 5)
    dm = CellDataModule(str(root), image_size=16, batch_size=6, num_workers=num_workers, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    n_train = len(dm.datasets["train"])
    assert sum(len(dm.datasets[name]) for name in ("train", "val", "test")) == 40 and n_train >= 6
    train = list(dm.train_dataloader())
    assert len(train) == n_train // 6  # drop_last
    for batch in train:
        assert batch["image"].shape == (6, 3, 16, 16) and batch["image"].dtype == torch.uint8
        assert batch["label"].shape == (6,) and batch["label"].dtype == torch.long
    assert sorted(b for batch in dm.test_dataloader() for b in batch["index"].tolist()) == sorted(
        dm.datasets["test"].indices.tolist()
    )
    moved = dm.on_after_batch_transfer(train[0], 0)
    assert moved["image"].dtype == torch.float32
    assert moved["image"].min() >= -1 and moved["image"].max() <= 1 and moved["image"].min() < 0 < moved["image"].max()
    np.testing.assert_array_equal(tensor_to_uint8(moved["image"]).numpy(), train[0]["image"].numpy())


def test_predict_noise_seeds_do_not_depend_on_batch_size(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 1, ["basophil", "ig", "platelet"])
    seeds = {}
    for batch_size in (1, 4, 10):
        dm = CellDataModule(str(root), num_predict_samples=10, predict_seed=7, predict_batch_size=batch_size)
        batches = list(dm.predict_dataloader())  # needs no setup and no cache
        seeds[batch_size] = torch.cat([b["noise_seed"] for b in batches]).tolist()
        assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(10)]
    assert seeds[1] == seeds[4] == seeds[10] and len(set(seeds[1])) == 10
    assert NoiseDataset(3, 3, predict_seed=8)[0]["noise_seed"] != seeds[1][0]
    assert 0 <= max(NoiseDataset(2, 1, predict_seed=2**62)[1].values()) < 2**63


def test_predict_from_test_split_interleaves_classes(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 10, ["basophil", "ig", "platelet"])
    dm = CellDataModule(str(root), image_size=16, predict_source="test", num_predict_samples=5, cache_dir=str(tmp_path))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    test_labels = dm.cached.labels[dm.datasets["test"].indices].tolist()
    counts = [test_labels.count(c) for c in range(3)]
    interleaved = [c for r in range(max(counts)) for c in range(3) if r < counts[c]]  # round-robin over classes
    assert batch["image"].shape == (5, 3, 16, 16) and batch["label"].tolist() == interleaved[:5]
    assert interleaved[:3] == [0, 1, 2]
    assert set(batch["index"].tolist()) <= set(dm.datasets["test"].indices.tolist())
    assert batch["noise_seed"].tolist() == [data_module.noise_seed_for(0, i) for i in range(5)]


def test_class_names_right_after_init_without_decoding(pbc_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "load_image", lambda *a, **k: pytest.fail("decoded"))
    dm = CellDataModule(str(pbc_sample), cache_dir=str(tmp_path / "c"))
    assert dm.num_classes == 8
    assert dm.class_names[:3] == ["basophil", "eosinophil", "erythroblast"]
    assert dm.split is None and not (tmp_path / "c").exists()
    with pytest.raises(DataError, match="predict_source"):
        CellDataModule(str(pbc_sample), predict_source="imagse")


class _Probe(L.LightningModule):
    """Records what a Trainer hands to the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in batch.items()})
        return (self.weight * batch["image"].mean()).sum()

    def predict_step(self, batch, batch_idx):
        return batch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_receives_float_images_on_device(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 4, ["basophil", "ig"])
    dm = CellDataModule(str(root), image_size=16, batch_size=2, cache_dir=str(tmp_path / "c"), num_predict_samples=3)
    probe = _Probe()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert len(probe.seen) == 2
    for batch in probe.seen:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 3, 16, 16)
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    predictions = trainer.predict(probe, datamodule=dm)
    assert torch.cat([p["index"] for p in predictions]).tolist() == [0, 1, 2]
    assert "image" not in predictions[0]
