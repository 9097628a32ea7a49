"""Training order, flips/rotations and masks are a pure function of (seed, epoch, global position).

So they do not depend on the rank or worker that handles an item, nor on the number of processes:
W processes with batch b see exactly the batches of one process with batch W x b (issue 13.2).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from celldiff.data.datamodule import CellDataModule
from celldiff.data.datasets import _MASK_DRAW, EpochSampler, MaskAssigner, draw_key
from celldiff.errors import DataError
from celldiff.seeds import mix_seed
from tests.conftest import SAMPLE
from tests.data.helpers import copy_sample


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return copy_sample(SAMPLE, tmp_path_factory.mktemp("draws") / "pbc", 6)  # 48 images, 33 in train


def datamodule(data_dir: Path, cache: Path, batch_size: int, **kwargs) -> CellDataModule:
    dm = CellDataModule(
        str(data_dir), image_size=16, batch_size=batch_size, cache_dir=str(cache), masks="box,brush,nucleus",
        augment=True, **kwargs,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def epoch_batches(dm: CellDataModule, world: int, rank: int, epoch: int) -> list[dict]:
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)  # what Lightning's Trainer tells it
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # Lightning calls this every epoch
    return list(loader)


def cat(batches: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in ("index", "label", "image", "mask")}


@pytest.mark.parametrize("class_balanced", [False, True], ids=["shuffle", "class-balanced"])
def test_w_processes_with_batch_b_see_the_batches_of_one_process_with_batch_wb(
    data_dir, tmp_path, monkeypatch, class_balanced
):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    b = 4
    for world in (2, 3):
        one = datamodule(data_dir, tmp_path / "c", world * b, class_balanced=class_balanced)
        many = datamodule(data_dir, tmp_path / "c", b, class_balanced=class_balanced)
        for epoch in (0, 1):
            reference = epoch_batches(one, 1, 0, epoch)
            per_rank = [epoch_batches(many, world, rank, epoch) for rank in range(world)]
            assert len(reference) == len(many.datasets["train"]) // (world * b) >= 2
            assert all(len(batches) == len(reference) for batches in per_rank)
            for step, global_batch in enumerate(reference):
                # Rank r holds the r-th slice of the global batch, the slice DiffusionModule gives it noise for.
                union = cat([per_rank[rank][step] for rank in range(world)])
                for key in ("index", "label", "image", "mask"):
                    torch.testing.assert_close(union[key], global_batch[key], rtol=0, atol=0, msg=(world, epoch, key))
    # The draws really vary: by epoch, and flips and masks differ between items.
    epoch0, epoch1 = cat(epoch_batches(one, 1, 0, 0)), cat(epoch_batches(one, 1, 0, 1))
    assert not torch.equal(epoch0["index"], epoch1["index"])
    assert len({m.sum().item() for m in epoch0["mask"]}) > 3
    again = cat(epoch_batches(one, 1, 0, 0))
    assert torch.equal(again["image"], epoch0["image"]) and torch.equal(again["mask"], epoch0["mask"])


def test_draws_do_not_depend_on_the_workers(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    by_workers = {}
    for workers in (0, 2):
        dm = datamodule(data_dir, tmp_path / "c", 4, num_workers=workers)
        by_workers[workers] = cat(epoch_batches(dm, 2, 1, epoch=2))
    for key in ("index", "image", "mask"):
        assert torch.equal(by_workers[0][key], by_workers[2][key]), key


def test_draws_follow_the_seed_and_survive_a_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    dm = datamodule(data_dir, tmp_path / "c", 4)
    first = cat(epoch_batches(dm, 1, 0, 1))
    state = dm.state_dict()
    assert state == {"train_seed": 1}
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")  # a resumed run that draws another seed keeps the run's sequence
    resumed = datamodule(data_dir, tmp_path / "c", 4)
    resumed.load_state_dict(state)
    assert torch.equal(cat(epoch_batches(resumed, 1, 0, 1))["image"], first["image"])
    other = cat(epoch_batches(datamodule(data_dir, tmp_path / "c", 4), 1, 0, 1))
    assert not torch.equal(other["index"], first["index"])


def test_the_sampler_order_is_lightnings_global_order_cut_into_global_batches():
    n, b = 23, 3
    for weights in (None, np.linspace(1, 2, n)):
        one = EpochSampler(n, 2 * b, seed=7, weights=weights)
        two = [EpochSampler(n, b, seed=7, num_replicas=2, rank=r, weights=weights) for r in range(2)]
        for sampler in (one, *two):
            sampler.set_epoch(4)
        items = list(one)
        assert len(items) == len(one) == 18 and all(len(s) == 9 for s in two)
        assert [k for _, k in items] == [draw_key(7, 4, p) for p in range(18)]
        shares = [list(s) for s in two]
        merged = [item for step in range(3) for s in shares for item in s[step * b : (step + 1) * b]]
        assert merged == items
    assert sorted(p for p, _ in EpochSampler(n, 2 * b, seed=7, drop_last=False)) == list(range(n))  # a permutation


def test_ddp_with_fewer_images_per_process_than_a_batch_is_one_clear_error(data_dir, tmp_path):
    dm = datamodule(data_dir, tmp_path / "c", 16)
    n = len(dm.datasets["train"])
    assert 16 < n < 3 * 16
    with pytest.raises(DataError, match=rf"holds {n} images, fewer than one batch of 16 per process on 3 processes"):
        epoch_batches(dm, 3, 0, 0)
    # One process keeps training on a train split smaller than a batch: one partial batch per epoch.
    tiny = datamodule(data_dir, tmp_path / "c", 64)
    batches = epoch_batches(tiny, 1, 0, 0)
    assert len(batches) == 1 and len(batches[0]["index"]) == n


def test_per_item_masks_equal_one_call_per_item(data_dir, tmp_path):
    """The batched nucleus pass with per-item generators gives each item its own-generator mask."""
    dm = datamodule(data_dir, tmp_path / "c", 8)
    images = dm.datasets["train"].get_batch(np.arange(16))["image"]
    masker = MaskAssigner({"nucleus": 2, "box": 1, "half": 1})
    keys = [draw_key(0, 0, p) for p in range(16)]
    masks = masker(images, np.arange(16), keys=keys)
    x = images.float().div(127.5).sub(1.0)
    for i, key in enumerate(keys):
        alone = masker.sampler(x[i], torch.Generator().manual_seed(mix_seed(key, _MASK_DRAW)))
        assert torch.equal(masks[i], (alone > 0.5).to(torch.uint8)), i
    # A batch of one item gets the same mask as inside the batch of 16.
    assert torch.equal(masker(images[3:4], np.arange(1), keys=keys[3:4])[0], masks[3])


def test_keyed_augmentation_is_one_of_the_eight_symmetries_and_uses_all_of_them(data_dir, tmp_path):
    dm = datamodule(data_dir, tmp_path / "c", 8)
    dataset, images = dm.datasets["train"], dm.cached.images
    seen = set()
    for epoch in range(4):
        keys = [draw_key(0, epoch, p) for p in range(len(dataset))]
        batch = dataset.get_batch(np.arange(len(dataset)), keys=keys)
        for i, image in enumerate(batch["image"].numpy()):
            chw = np.asarray(images[dataset.indices[i]]).transpose(2, 0, 1)
            symmetries = [np.rot90(f, k, axes=(1, 2)) for f in (chw, chw[:, :, ::-1]) for k in range(4)]
            matches = [k for k, t in enumerate(symmetries) if np.array_equal(image, t)]
            assert matches, "augmentation must be a symmetry of the square"
            seen.add(matches[0])
        again = dataset.get_batch(np.arange(len(dataset)), keys=keys)  # a pure function of the keys
        assert torch.equal(again["image"], batch["image"]) and torch.equal(again["mask"], batch["mask"])
    assert seen == set(range(8))
