"""Datasets on the cache (celldiff.data.datasets): flips and rotations, pickling, noise items."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from celldiff.data.datamodule import CellDataModule
from celldiff.data.datasets import CellImageDataset, NoiseDataset
from celldiff.data.imagecache import build_cache
from celldiff.data.scan import scan_dataset
from tests.data.helpers import copy_sample, dihedral


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
