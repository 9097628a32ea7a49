"""Morphological fidelity: segmentation and features on drawn cells of known geometry, W1 closed forms,
the per-class distances and their floor, the report, and ``evaluate --morphology``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from celldiff.evaluation.morphology import (
    FEATURES,
    failure_summary,
    morphology_distances,
    morphology_features,
    segment,
    wasserstein_1d,
)
from celldiff.evaluation.report import morphology_figure, morphology_markdown
from tests.conftest import REPO

BACKGROUND, CYTOPLASM, NUCLEUS, RED_CELL = (252, 226, 204), (200, 150, 175), (110, 60, 140), (209, 171, 171)


def _draw(size: int = 64, cell: float = 12.0, nuclei: tuple[tuple[float, float, float], ...] = ((0, 0, 6),),
          red_cells: tuple[tuple[float, float, float], ...] = (), scale: float = 1.0) -> np.ndarray:  # fmt: skip
    """(size, size, 3) uint8: pale background, pink-lilac cell disc (radius ``cell`` px at 64 px) at the
    centre, purple nucleus discs (dy, dx, radius) relative to the centre, pink red cells (dy, dx, radius)."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for dy, dx, radius in red_cells:
        image[(y - dy * scale) ** 2 + (x - dx * scale) ** 2 <= (radius * scale) ** 2] = RED_CELL
    image[y**2 + x**2 <= (cell * scale) ** 2] = CYTOPLASM
    for dy, dx, radius in nuclei:
        image[(y - dy * scale) ** 2 + (x - dx * scale) ** 2 <= (radius * scale) ** 2] = NUCLEUS
    return image


def _features(*images: np.ndarray) -> dict[str, np.ndarray]:
    return morphology_features(np.stack(images))


def test_disc_cell_areas_ratio_diameter_solidity_and_colours():
    feats = _features(_draw(cell=12, nuclei=((0, 0, 6),)))
    assert not feats["failed"][0]
    assert feats["cell_area"][0] == pytest.approx(math.pi * 12**2 / 64**2, rel=0.05)
    assert feats["nucleus_area"][0] == pytest.approx(math.pi * 6**2 / 64**2, rel=0.08)
    assert feats["nc_ratio"][0] == pytest.approx(0.25, rel=0.1)
    assert feats["cell_diameter"][0] == pytest.approx(24 / 64, rel=0.03)
    assert feats["nucleus_solidity"][0] > 0.95 and feats["nucleus_lobes"][0] == 1
    for c, channel in enumerate(("red", "green", "blue")):
        assert feats[f"nucleus_{channel}"][0] == pytest.approx(NUCLEUS[c], abs=4)
        assert feats[f"cytoplasm_{channel}"][0] == pytest.approx(CYTOPLASM[c], abs=6)


def test_two_lobes_and_a_crescent_have_lower_solidity():
    bridge = _draw(cell=16, nuclei=((0, -6, 5), (0, 6, 5), (0, -2, 1), (0, 0, 1), (0, 2, 1)))  # joined by a thin bridge
    apart = _draw(cell=16, nuclei=((0, -5.5, 4.5), (0, 5.5, 4.5)))  # 2 px apart: one nucleus, two lobes
    disc = _draw(cell=16, nuclei=((0, 0, 7),))
    crescent = _draw(cell=16, nuclei=((0, 0, 8),))
    y, x = np.mgrid[:64, :64] - 31.5
    crescent[(y**2 + (x - 5) ** 2 <= 7**2) & (y**2 + x**2 <= 8**2)] = CYTOPLASM
    feats = _features(bridge, apart, disc, crescent)
    assert not feats["failed"].any()
    assert list(feats["nucleus_lobes"]) == [2, 2, 1, 1]
    two_discs = 2 * math.pi * 4.5**2 / 64**2
    assert feats["nucleus_area"][1] == pytest.approx(two_discs, rel=0.1)  # both lobes, not just one
    assert feats["nucleus_solidity"][2] > 0.95
    assert feats["nucleus_solidity"][0] < 0.9 and feats["nucleus_solidity"][1] < 0.8 and feats["nucleus_solidity"][3] < 0.8


def test_convex_hull_pixels():
    from celldiff.evaluation.morphology import _convex_pixels

    y, x = np.mgrid[:64, :64] - 31.5
    for radius in (1, 6, 20):  # a digitised disc is its own digital convex hull
        disc = y**2 + x**2 <= radius**2
        assert _convex_pixels(disc) == disc.sum()
    two = np.zeros((20, 20), dtype=bool)
    two[5:10, 2:7] = two[5:10, 12:17] = True
    assert _convex_pixels(two) == 75 and _convex_pixels(two.T) == 75  # the gap between them is filled
    assert _convex_pixels(np.eye(6, dtype=bool)) == 6 and _convex_pixels(np.zeros((4, 4), dtype=bool)) == 0


def test_touching_red_cells_stay_out_of_the_cell():
    alone = _draw(cell=12)
    crowded = _draw(cell=12, red_cells=((0, 17, 6), (-15, -8, 6), (14, -10, 6), (20, 20, 6)))
    feats = _features(alone, crowded)
    assert feats["cell_area"][1] == pytest.approx(feats["cell_area"][0], rel=0.05)
    cell, nucleus = segment(crowded[None])
    assert cell.shape == (1, 64, 64) and cell.dtype == bool and (nucleus <= cell).all()
    assert not cell[0, 32, 32 + 17]  # the red cell's centre


def test_a_touching_white_cell_is_cut_off_at_the_neck():
    image = _draw(cell=12)
    y, x = np.mgrid[:64, :64] - 31.5
    image[y**2 + (x - 22) ** 2 <= 11**2] = CYTOPLASM  # a second cell to the right, touching
    image[y**2 + (x - 24) ** 2 <= 6**2] = NUCLEUS
    feats = _features(image, _draw(cell=12))
    assert feats["cell_area"][0] < 1.35 * feats["cell_area"][1]
    assert feats["nucleus_area"][0] == pytest.approx(feats["nucleus_area"][1], rel=0.1)


def test_features_do_not_depend_on_the_resolution():
    small = _features(_draw(64, cell=12, nuclei=((0, -5, 4), (0, 5, 4))))
    large = morphology_features(_draw(128, cell=12, nuclei=((0, -5, 4), (0, 5, 4)), scale=2.0)[None])
    for name in ("nucleus_area", "cell_area", "nc_ratio", "cell_diameter", "nucleus_lobes"):
        assert large[name][0] == pytest.approx(small[name][0], rel=0.1), name


def test_layouts_and_types():
    images = np.stack([_draw(), _draw(cell=10, nuclei=((0, 0, 5),))])
    nhwc = morphology_features(images)
    nchw = morphology_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    for name in FEATURES:
        np.testing.assert_allclose(nhwc[name], nchw[name])
    with pytest.raises(ValueError, match="uint8"):
        morphology_features(images.astype(np.float32))
    empty = morphology_features(np.zeros((0, 64, 64, 3), dtype=np.uint8))
    assert all(len(v) == 0 for v in empty.values())


def test_failed_segmentation_is_nan_and_counted():
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    feats = _features(_draw(), blank)
    assert list(feats["failed"]) == [False, True]
    assert all(math.isnan(feats[name][1]) for name in FEATURES)
    cell, nucleus = segment(blank[None])
    assert not cell.any() and not nucleus.any()
    summary = failure_summary(feats, [0, 0], feats, [0, 1], ["a", "b"])
    assert summary[0]["failed_real"] == 0.5 and summary[0]["failed_generated"] == 0.0
    assert summary[1]["failed_generated"] == 1.0 and summary[1]["n_real"] == 0


def test_wasserstein_closed_forms():
    assert wasserstein_1d([0.0], [3.0]) == pytest.approx(3.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    assert wasserstein_1d(x, x + 2.5) == pytest.approx(2.5)
    assert wasserstein_1d(x, x) == 0.0
    y = rng.normal(size=77) * 3
    assert wasserstein_1d(4 * x, 4 * y) == pytest.approx(4 * wasserstein_1d(x, y))
    assert wasserstein_1d([0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)  # the same distribution, unequal sizes
    assert wasserstein_1d([0.0], [0.0, 1.0]) == pytest.approx(0.5)
    assert wasserstein_1d([0.0, 2.0], [1.0]) == pytest.approx(1.0)
    assert wasserstein_1d([1.0, math.nan], [2.0]) == pytest.approx(1.0) and math.isnan(wasserstein_1d([], [1.0]))
    # against the quantile form: integral over u of |F^-1(u) - G^-1(u)|
    u = (np.arange(200 * 77) + 0.5) / (200 * 77)
    quantiles = np.abs(np.sort(x)[(u * 200).astype(int)] - np.sort(y)[(u * 77).astype(int)]).mean()
    assert wasserstein_1d(x, y) == pytest.approx(quantiles, rel=1e-9)


def _feats(values: np.ndarray) -> dict[str, np.ndarray]:
    return {**{name: values.astype(np.float64) for name in FEATURES}, "failed": np.zeros(len(values), dtype=bool)}


def test_distances_are_normalised_by_the_real_spread_with_a_floor():
    rng = np.random.default_rng(1)
    real, same, shifted = rng.normal(size=400) * 2, rng.normal(size=100) * 2, rng.normal(size=100) * 2 + 2
    labels = np.zeros(400, dtype=int)
    rows = morphology_distances(_feats(real), labels, _feats(np.concatenate([same, shifted])),
                                np.repeat([0, 1], 100), ["a", "b"], seed=0)  # fmt: skip
    assert len(rows) == 2 * len(FEATURES) and {r["feature"] for r in rows} == set(FEATURES)
    a = next(r for r in rows if r["class"] == "a")
    assert a["scale"] == pytest.approx(real.std()) and a["n_generated"] == 100 and a["floor_n"] == 100
    assert a["normalised_w1"] < 0.3 and 0 < a["floor"] < 0.3  # a matching generator scores about its floor
    assert next(r for r in rows if r["class"] == "b")["n_real"] == 0  # no real cells: no distance
    rows = morphology_distances(_feats(real), labels, _feats(shifted), np.zeros(100, dtype=int), ["a"],
                                floor_feats=_feats(rng.normal(size=300) * 2), floor_labels=np.zeros(300, dtype=int))  # fmt: skip
    assert rows[0]["normalised_w1"] == pytest.approx(1.0, abs=0.3) and rows[0]["floor"] < 0.3 and rows[0]["floor_n"] == 100


def test_table_and_figure(tmp_path):
    rng = np.random.default_rng(2)
    rows = morphology_distances(_feats(rng.normal(size=50)), np.arange(50) % 2, _feats(rng.normal(size=20) + 1),
                                np.arange(20) % 2, ["basophil", "platelet"])  # fmt: skip
    table = morphology_markdown({"guidance 1": rows})
    assert "**guidance 1**" in table and "| basophil |" in table and table.count("(") == 2 * len(FEATURES)
    pytest.importorskip("matplotlib")
    path = morphology_figure({"guidance 0": rows, "guidance 1": rows, "inpainting": rows}, tmp_path / "fig.png")
    assert path.stat().st_size > 1000


class _Replay:
    """An unconditional "model" whose samples are real cells: the run's plumbing, no training."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.device = images, torch.device("cpu")
        self.hparams = SimpleNamespace(inpainting=False, class_conditional=False, image_size=images.shape[-1],
                                       sampler="replay", sampling_steps=0)  # fmt: skip

    def network_condition(self, batch: dict) -> dict:
        return batch

    def generate(self, seeds: list[int], condition: dict, **_: object) -> torch.Tensor:
        return self.images[torch.tensor(seeds) % len(self.images)].float() / 127.5 - 1


@pytest.mark.parametrize("inpainting", [False, True])
def test_run_evaluation_writes_the_morphology_section(small_sample, tmp_path, inpainting):
    from celldiff.data import CellDataModule
    from celldiff.evaluation.baselines import FillBaseline
    from celldiff.evaluation.judge import Judge
    from celldiff.evaluation.run import _split_images, run_evaluation
    from celldiff.nets.classifier import CellResNet

    dm = CellDataModule(data_dir=str(small_sample), image_size=64, batch_size=8, eval_masks="nucleus" if inpainting else None)
    dm.prepare_data()
    dm.setup("fit")
    judge = Judge(CellResNet(8, width=8, feature_dim=16), {"image_size": 32, "class_names": list(dm.class_names), "num_classes": 8})
    model = FillBaseline("blur_fill", 64) if inpainting else _Replay(_split_images(dm, "train"))
    metrics = run_evaluation(model, dm, judge.eval(), tmp_path / "eval", num_samples=8, morphology=True)
    section = json.loads((tmp_path / "eval" / "metrics.json").read_text())["morphology"]
    assert section["features"] == list(FEATURES) and metrics["morphology"]["grouping"]
    groups = section["groups"]
    assert [g["group"] for g in groups] == (["nucleus"] if inpainting else ["all"])
    assert len(groups[0]["rows"]) == 8 * len(FEATURES) and len(groups[0]["classes"]) == 8
    assert sum(row["n_generated"] for row in groups[0]["classes"]) == 8
    report = (tmp_path / "eval" / "metrics.md").read_text()
    assert "## Morphology" in report and "nucleus_solidity" in report
    from celldiff.evaluation.morphology_cells import histogram_figure, load_cells, select

    cells = load_cells(tmp_path / "eval" / "morphology_cells.npz")  # every cell's values behind the table
    assert list(cells["classes"]) == list(dm.class_names) and len(cells["real_class"]) == len(dm.datasets["test"])
    assert len(cells["fake_class"]) == 8 and cells["fake_nucleus_area"].dtype == np.float32
    assert list(cells["fake_family"]) == (["nucleus"] * 8 if inpainting else [])
    fake, fake_class = select(cells, "nucleus" if inpainting else None)
    assert len(fake_class) == 8 and set(fake) == set(FEATURES)
    real = ({f: cells[f"real_{f}"] for f in FEATURES}, cells["real_class"])
    png = histogram_figure(real, {"generated": (fake, fake_class)}, list(cells["classes"]), tmp_path / "h.png")
    assert png.stat().st_size > 10_000


@pytest.mark.skipif("--morphology" not in (REPO / "celldiff" / "cli" / "main.py").read_text(),
                    reason="needs the --morphology argument in celldiff/cli/main.py's parser")  # fmt: skip
def test_evaluate_cli_morphology(small_sample, tmp_path):
    from tests.cli.helpers import run_cli
    from tests.conftest import TINY_MODEL_ARGS
    from tests.evaluation.test_evaluate_cli import TINY_CLASSIFIER

    runs = {}
    for name, config, extra in (("cls", "demo_classifier.yaml", TINY_CLASSIFIER),
                                ("uncond", "demo.yaml", [*TINY_MODEL_ARGS, "--trainer.callbacks", "[]"])):  # fmt: skip
        run_cli(["fit", "--config", str(REPO / "configs" / config), "--data.data_dir", str(small_sample), "--run_dir",
                 str(tmp_path / name), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *extra],
                tmp_path)  # fmt: skip
        runs[name] = tmp_path / name / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(runs["uncond"]),
             "--classifier_ckpt", str(runs["cls"]), "--output_dir", str(out), "--num_samples", "8",
             "--model.sampling_steps", "2", "--data.data_dir", str(small_sample), "--morphology", "true"], tmp_path)  # fmt: skip
    assert [g["group"] for g in json.loads((out / "metrics.json").read_text())["morphology"]["groups"]] == ["all"]
    assert "## Morphology" in (out / "metrics.md").read_text()


def test_morphology_cells_archive_round_trip_and_histograms(tmp_path):
    """The per-cell archive loads without pickle, selects a family, and refuses a file that is not one."""
    from celldiff.evaluation.morphology_cells import cells_archive, histogram_figure, load_cells, save_cells, select

    rng = np.random.default_rng(0)
    real = {f: rng.normal(1, 0.2, 40) for f in FEATURES}
    real["nucleus_lobes"] = rng.integers(1, 5, 40).astype(float)
    fake = {f: np.append(rng.normal(1.2, 0.2, 11), np.nan) for f in FEATURES}  # one failed segmentation
    families = ["box"] * 6 + ["nucleus"] * 6
    arrays = cells_archive(real, np.arange(40) % 2, fake, np.arange(12) % 2, ["a", "b"], "the real class", families)
    path = save_cells(arrays, tmp_path / "x" / "morphology_cells.npz")
    cells = load_cells(path)
    assert list(cells["classes"]) == ["a", "b"] and str(cells["grouping"]) == "the real class"
    np.testing.assert_allclose(cells["real_cell_area"], real["cell_area"].astype(np.float32))
    values, classes = select(cells, "nucleus")
    assert len(classes) == 6 and np.isnan(values["nucleus_area"][-1])
    assert len(select(cells, None)[1]) == 12
    real_pair = ({f: cells[f"real_{f}"] for f in FEATURES}, cells["real_class"])
    png = histogram_figure(real_pair, {"nucleus": (values, classes), "all": select(cells, None)}, ["a", "b"], tmp_path / "h.png")
    assert png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="unknown feature 'size'"):
        histogram_figure(real_pair, {}, ["a", "b"], tmp_path / "g.png", features=["size"])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a morphology_cells.npz"):
        load_cells(tmp_path / "other.npz")
