"""CellDataModule (celldiff.data.datamodule): loaders, the device hook, predict sources, arguments, flags."""

from __future__ import annotations

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch

import celldiff.data.imagecache as cache_module
from celldiff.data.datamodule import CellDataModule, predicts_with_masks
from celldiff.data.datasets import MaskAssigner
from celldiff.errors import DataError
from celldiff.images import to_uint8
from celldiff.masks.mixture import FAMILIES, Family
from celldiff.seeds import sample_seed
from tests.conftest import SAMPLE
from tests.data.helpers import copy_sample, one_line


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
    np.testing.assert_array_equal(to_uint8(moved["image"]).numpy(), train[0]["image"].numpy())


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
    assert batch["noise_seed"].tolist() == [sample_seed(0, i) for i in range(5)]


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


# ------------------------------------------------------------------------------ arguments


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


def test_a_mask_option_value_the_generator_rejects_fails_at_start_up():
    with pytest.raises(DataError, match="data.masks 'brush' with data.mask_options"):
        MaskAssigner("brush", {"brush": {"num_strokes": [5, 1]}})


def test_a_family_added_to_the_registry_is_accepted_and_a_broken_one_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(FAMILIES, "frame", Family(lambda size, generator: torch.ones(1, size, size).index_fill_(1, torch.arange(2, size - 2), 0)))
    dm = CellDataModule(str(SAMPLE), cache_dir=str(tmp_path), masks={"frame": 1, "box": 1}, eval_masks="frame")
    assert dm.eval_masker is not None and dm.eval_mask_families == ["frame"]
    monkeypatch.setitem(FAMILIES, "grey", Family(lambda size, generator: torch.full((1, size, size), 0.5)))
    with pytest.raises(DataError, match="data.masks 'grey': mask values must be exactly 0.0 or 1.0") as error:
        CellDataModule(str(SAMPLE), cache_dir=str(tmp_path), masks="grey")
    one_line(error)


# ------------------------------------------------------------------------------ flags and what they change


def _fixed_test_masks(dm: CellDataModule) -> torch.Tensor:
    return torch.cat([batch["mask"] for batch in dm.test_dataloader()]).float()


@pytest.mark.parametrize("pin_memory", [True, False])
def test_pin_memory_pins_the_host_batches_when_there_is_a_gpu(pbc_sample, tmp_path, monkeypatch, pin_memory):
    root = copy_sample(pbc_sample, tmp_path / "d", 3, ["basophil", "ig", "platelet"])
    dm = CellDataModule(
        str(root), image_size=8, batch_size=2, pin_memory=pin_memory, cache_dir=str(tmp_path / "c"), num_predict_samples=2
    )
    dm.prepare_data()
    dm.setup("fit")
    if torch.cuda.is_available():  # the effect itself, where there is a GPU
        assert next(iter(dm.val_dataloader()))["image"].is_pinned() is pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()]
    assert [loader.pin_memory for loader in loaders] == [pin_memory] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dm.train_dataloader().pin_memory is False  # no GPU: nothing to pin for


def test_mask_seed_chooses_the_fixed_evaluation_masks(pbc_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    root = copy_sample(pbc_sample, tmp_path / "d", 4)
    built = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        dm = CellDataModule(str(root), image_size=16, batch_size=8, masks="box,brush", mask_seed=seed, cache_dir=str(tmp_path / "c"))
        dm.prepare_data()
        dm.setup("fit")
        built[name] = (dm, _fixed_test_masks(dm), torch.cat([b["mask"] for b in dm.train_dataloader()]))
    first, again, other = (built[name][1] for name in ("first", "again", "other"))
    assert torch.equal(first, again)  # the same seed: every test cell gets its mask again, in another run
    assert not torch.equal(first, other)  # another seed: other masks
    assert (first != other).flatten(1).any(1).float().mean() > 0.5  # for most cells, not by chance for one
    assert torch.equal(built["first"][2], built["other"][2])  # training masks follow the training seed only
    # Fixed per cell whatever the batch: the predict items from the test split carry the same masks.
    dm = built["first"][0]
    dm.predict_source, dm.num_predict_samples = "test", -1
    predicted = {int(i): m for b in dm.predict_dataloader() for i, m in zip(b["index"], b["mask"], strict=True)}
    rows = dm.datasets["test"].indices.tolist()
    assert all(torch.equal(predicted[row].float(), first[k]) for k, row in enumerate(rows))


def test_mask_options_change_the_masks(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 4)
    masks = {}
    for name, options in (("default", None), ("one_box", {"box": {"num_boxes": [1, 1], "box_size": [0.5, 0.5]}})):
        dm = CellDataModule(str(root), image_size=16, batch_size=8, masks="box", mask_options=options, cache_dir=str(tmp_path / "c"))
        dm.prepare_data()
        dm.setup("fit")
        train = torch.cat([b["mask"] for b in dm.train_dataloader()]).float()
        masks[name] = torch.cat([_fixed_test_masks(dm), train])
    covered = {name: m.flatten(1).mean(1) for name, m in masks.items()}
    assert (covered["one_box"] == 0.25).all()  # exactly one 8 x 8 box in 16 x 16, in training and in evaluation
    assert len(set(covered["default"].tolist())) > 3  # 1 to 3 boxes of 10 % to 40 % of the side


def test_fixed_mask_batch_is_what_the_loaders_give(pbc_sample, tmp_path):
    root = copy_sample(pbc_sample, tmp_path / "d", 4)
    args = dict(image_size=16, batch_size=64, mask_seed=3, cache_dir=str(tmp_path / "c"))
    dm = CellDataModule(str(root), masks={"box": 1, "nucleus": 2}, eval_masks="nucleus,half", **args)
    dm.prepare_data()
    dm.setup("fit")
    from_loader = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    positions = np.arange(len(from_loader["index"]))
    fixed = dm.fixed_mask_batch("test", positions)
    assert fixed["image"].dtype == fixed["mask"].dtype == torch.float32 and fixed["mask"].shape == (len(positions), 1, 16, 16)
    for key in ("image", "mask", "label", "index"):
        assert torch.equal(fixed[key], from_loader[key]), key
    assert dm.eval_mask_families == ["half", "nucleus"]  # registry order, one evaluation each
    # One family: the masks of a data module that evaluates on that family alone.
    only_half = CellDataModule(str(root), masks="half", **args)
    only_half.setup("fit")
    half = dm.fixed_mask_batch("test", positions, family="half")["mask"]
    assert torch.equal(half, only_half.fixed_mask_batch("test", positions)["mask"])
    # Training images come unaugmented.
    train = dm.fixed_mask_batch("train", [0, 1])
    raw = torch.from_numpy(np.asarray(dm.cached.images)[dm.datasets["train"].indices[:2]]).permute(0, 3, 1, 2)
    assert torch.equal(to_uint8(train["image"]), raw)
    plain = CellDataModule(str(root), **args)
    plain.setup("fit")
    assert plain.fixed_mask_batch("val", [0]) is None and plain.eval_mask_families == []
    assert plain.fixed_mask_batch("val", [0], family="box")["mask"].shape == (1, 1, 16, 16)
    with pytest.raises(DataError, match=r"unknown mask type\(s\) \['circle'\]"):
        plain.fixed_mask_batch("val", [0], family="circle")
    with pytest.raises(RuntimeError, match="setup"):
        CellDataModule(str(root), masks="box", **args).fixed_mask_batch("val", [0])


def test_predicts_with_masks_says_what_num_samples_counts(pbc_sample, tmp_path):
    assert predicts_with_masks("my_images", "noise", None, None)  # a user's images: samples per image
    assert predicts_with_masks(None, "test", "box", None)
    assert predicts_with_masks(None, "val", None, "nucleus")
    assert not predicts_with_masks(None, "noise", "box", "nucleus")  # from noise: the number of images
    assert not predicts_with_masks(None, "test", None, None)  # a split without masks: at most that many images
    root = copy_sample(pbc_sample, tmp_path / "d", 3, ["basophil", "ig"])
    for source in ("noise", "test"):
        dm = CellDataModule(str(root), image_size=8, masks="box", predict_source=source, cache_dir=str(tmp_path / "c"))
        dm.prepare_data()
        dm.setup("predict")
        batch = next(iter(dm.predict_dataloader()))
        assert dm.predict_with_masks == ("mask" in batch) == (source == "test")
