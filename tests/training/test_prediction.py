"""PredictionWriter: the files of a predict batch, and grid.png from the images it wrote (never read back)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from celldiff.images import image_grid, labelled_rows, to_uint8
from celldiff.training.prediction import PredictionWriter

SIZE = 8
TRAINER = SimpleNamespace(world_size=1, is_global_zero=True)


def _module(class_conditional: bool = False) -> SimpleNamespace:
    return SimpleNamespace(hparams=SimpleNamespace(class_names=["a", "b", "c"], class_conditional=class_conditional))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _write(writer: PredictionWriter, module, prediction: dict) -> None:
    writer.write_on_batch_end(TRAINER, module, prediction, None, None, 0, 0)


def _generated(writer: PredictionWriter, module, batches: list[tuple[list[int], torch.Tensor]], labels=None) -> None:
    for index, images in batches:
        prediction = {"images": images, "index": torch.tensor(index)}
        if labels is not None:
            prediction["label"] = torch.tensor([labels[i] for i in index])
        _write(writer, module, prediction)


@pytest.mark.parametrize("nrow", [None, 2, 5])
def test_grid_of_generated_images_in_index_order_with_nrow(tmp_path, nrow):
    images = _images(5)
    writer = PredictionWriter(str(tmp_path), nrow=nrow)
    module = _module()
    _generated(writer, module, [([3, 4], images[3:]), ([0, 1, 2], images[:3])])  # batches out of order
    for path in tmp_path.glob("sample_*.png"):  # the grid is built from memory, not from these files
        path.unlink()
    writer.on_predict_epoch_end(TRAINER, module)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid, image_grid(to_uint8(images), nrow))
    columns = nrow or 3  # about sqrt(5)
    assert grid.shape[1] == columns * (SIZE + 2) + 2


def test_grid_of_a_class_conditional_model_has_one_labelled_row_per_class(tmp_path):
    images = _images(4)
    labels = [2, 2, 0, 0]  # requested as c, then a
    writer = PredictionWriter(str(tmp_path))
    module = _module(class_conditional=True)
    _generated(writer, module, [([0, 1, 2, 3], images)], labels)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a_00002.png", "a_00003.png", "c_00000.png", "c_00001.png"]
    writer.on_predict_epoch_end(TRAINER, module)
    rows = [("c", image_grid(to_uint8(images[:2]), nrow=2)), ("a", image_grid(to_uint8(images[2:]), nrow=2))]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), labelled_rows(rows))


def _inpainting(index: list[int], k: int = 2, seed: int = 0) -> dict:
    n = len(index)
    mask = torch.zeros(n, 1, SIZE, SIZE)
    mask[..., 2:6, 2:6] = 1
    samples = torch.rand(n, k, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"images": samples, "known": _images(n, seed + 1), "mask": mask, "index": torch.tensor(index),
            "label": torch.tensor([1] * n)}  # fmt: skip


@pytest.mark.parametrize("max_grid_panels", [1, 3, 16])
def test_inpainting_grid_stacks_the_first_max_grid_panels_panels(tmp_path, max_grid_panels):
    writer = PredictionWriter(str(tmp_path), max_grid_panels=max_grid_panels)
    module = _module()
    _write(writer, module, _inpainting([7, 2], seed=0))
    _write(writer, module, _inpainting([5], seed=5))
    panels = sorted(tmp_path.glob("*_panel.png"))
    assert [p.name for p in panels] == ["b_00002_panel.png", "b_00005_panel.png", "b_00007_panel.png"]
    assert len(list(tmp_path.glob("*_inpainted_*.png"))) == 3 * 2
    expected = np.concatenate([np.asarray(Image.open(p)) for p in panels[:max_grid_panels]])
    for path in panels:
        path.unlink()
    writer.on_predict_epoch_end(TRAINER, module)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid, expected)
    assert grid.shape[0] == min(max_grid_panels, 3) * (SIZE + 4)  # one row of tiles (with padding) per panel


def test_grid_settings_are_checked():
    with pytest.raises(ValueError, match="nrow=0"):
        PredictionWriter("unused", nrow=0)
    with pytest.raises(ValueError, match="max_grid_panels=0"):
        PredictionWriter("unused", max_grid_panels=0)
