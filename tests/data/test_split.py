"""The split (celldiff.data.split): content-hash placement, stratification, duplicates, split files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from celldiff.data.datamodule import CellDataModule
from celldiff.data.split import Split, load_split, make_split, save_split, split_indices
from celldiff.errors import DataError
from tests.data.helpers import copy_sample, real_jpegs, record_data_warnings


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
