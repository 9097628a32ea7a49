"""scripts/shipped_tables.py: the Set 3 tables and figures from a fake docs/results/ship64 folder."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shipped_tables.py"
# A real report of the same kind (unconditional generation, without the morphology section).
EXAMPLE = Path.home() / "celldiff-runs/evals/ship_64/step0000938-9ccba65c/metrics.json"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
FEATURES = ["nucleus_area", "cell_area", "nc_ratio", "nucleus_solidity", "nucleus_lobes", "cell_diameter",
            "nucleus_red", "nucleus_green", "nucleus_blue", "cytoplasm_red", "cytoplasm_green", "cytoplasm_blue"]  # fmt: skip
# The keys the tables read, copied from EXAMPLE (used where that file is not on this machine).
EXAMPLE_KEYS = {
    "feature_space": "celldiff cell classifier (256-d penultimate features)",
    "classifier_accuracy_real_test": 0.980836236933798, "num_samples": 1000, "num_real": 3444,
    "frechet_distance": 26.112734760958745, "kernel_distance": 0.17074652639650267, "precision": 0.737,
    "recall": 0.1765389082462253, "frechet_distance_n": 1000, "frechet_distance_reference_n": 3444,
    "frechet_distance_floor": 0.22383849451364973, "frechet_distance_floor_n": 1000,
    "frechet_distance_floor_reference_n": 3444, "kernel_distance_floor": -0.0006684313719365065,
    "kernel_distance_floor_n": 1000, "kernel_distance_floor_reference_n": 2444,
    "class_mix": {
        "total_variation": 0.4955981416957027, "total_variation_floor": 0.029820993031358878,
        "generated_fractions": [0.0, 0.013, 0.041, 0.343, 0.0, 0.024, 0.517, 0.062],
        "real_fractions": [0.07084785133565621, 0.18147502903600465, 0.0972706155632985, 0.1710220673635308,
                           0.06707317073170732, 0.08275261324041812, 0.19337979094076654, 0.13617886178861788],
        "classes": CLASSES,
    },
    "memorisation": {"num_generated": 1000, "num_train": 11882, "num_test": 3444, "feature": {
        "gen_to_train_median": 1.90643917244838, "test_to_train_median": 0.6302694924020674,
        "median_ratio": 3.024800018770711, "test_to_train_p01": 0.23767408095379686, "fraction_below_test_p01": 0.0}},
}  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location("_script_shipped_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shipped_tables = _load()


def _morphology_rows(offset: float, skip: tuple[str, ...] = ()) -> list[dict]:
    """``morphology_distances``-like rows: normalised W1 = offset + 0.1 class + 0.02 feature, floor 0.05.

    A class in ``skip`` has no generated cells (no W1), as unconditional classes the judge never gave.
    """
    rows = []
    for c, name in enumerate(CLASSES):
        for j, feature in enumerate(FEATURES):
            row = {"class": name, "feature": feature, "n_real": 40, "n_generated": 0 if name in skip else 20}
            if name not in skip:
                value = offset + 0.1 * c + 0.02 * j
                row.update(w1=value, scale=1.0, normalised_w1=value, floor=0.05, floor_n=20, real_median=0.3,
                           generated_median=0.3)  # fmt: skip
            rows.append(row)
    return rows


def _morphology(groups: dict[str, list[dict]]) -> dict:
    return {"features": FEATURES, "grouping": "the requested class", "comparison": "...", "method": "docs/morphology.md",
            "groups": [{"group": g, "classes": [], "rows": rows} for g, rows in groups.items()]}  # fmt: skip


@pytest.fixture
def example() -> dict:
    if EXAMPLE.is_file():
        metrics = json.loads(EXAMPLE.read_text())
        assert {k: metrics[k] for k in EXAMPLE_KEYS if k != "memorisation"} == {
            k: v for k, v in EXAMPLE_KEYS.items() if k != "memorisation"
        }
        return metrics
    return copy.deepcopy(EXAMPLE_KEYS)


def _ship64(root: Path, example: dict) -> Path:
    """docs/results/ship64 with uncond (the example + morphology), class_g2 and inpaint_g1; no class_g1 / class_g4."""
    folder = root / "ship64"
    folder.mkdir(parents=True)
    uncond = {**example, "morphology": _morphology({"all": _morphology_rows(1.0, skip=("basophil", "lymphocyte"))})}
    class_g2 = {k: v for k, v in copy.deepcopy(example).items() if k != "class_mix"}
    class_g2.update(num_samples=800, frechet_distance=12.3456, frechet_distance_n=800, frechet_distance_floor=0.2719,
                    frechet_distance_floor_n=800, kernel_distance=0.04321, kernel_distance_floor=0.000123,
                    precision=0.8111, recall=0.4444)  # fmt: skip
    class_g2["memorisation"] = {"feature": {"median_ratio": 2.5, "fraction_below_test_p01": 0.0123}}
    accuracy = {name: 0.5 + 0.05 * c for c, name in enumerate(CLASSES)}  # basophil 0.500 ... platelet 0.850
    class_g2["classifier"] = {"accuracy": 0.8125, "per_class_accuracy": accuracy,
                              "per_class_count": dict.fromkeys(CLASSES, 100), "mean_confidence": 0.7777,
                              "class_names": CLASSES, "confusion_matrix": [[0] * 8] * 8, "num_samples": 800}  # fmt: skip
    class_g2["morphology"] = _morphology({"all": _morphology_rows(0.5)})
    inpaint = {k: v for k, v in copy.deepcopy(example).items() if k != "class_mix"}
    inpaint.update(num_samples=900, frechet_distance_n=150, frechet_distance_reference_n=3294)
    inpaint["inpainting"] = [
        {"family": family, "n": 150, "mse": 0.01234 * (i + 1), "psnr": 21.37 + i, "ssim": 0.7654, "seam": 0.04567,
         "frechet_distance": 5.678 + i, "kernel_distance": 0.0345, "precision": 0.7, "recall": 0.6, "floor": 1.234}
        for i, family in enumerate(["box", "nucleus"])
    ]  # fmt: skip
    inpaint["morphology"] = _morphology({"box": _morphology_rows(0.3), "nucleus": _morphology_rows(0.2)})
    for name, metrics in {"uncond": uncond, "class_g2": class_g2, "inpaint_g1": inpaint}.items():
        (folder / f"{name}.json").write_text(json.dumps(metrics))
    return folder


def test_number_formats():
    sig, dec = shipped_tables.sig, shipped_tables.dec
    assert [sig(26.112), sig(0.22383), sig(-0.00066843), sig(1234.6), sig(0.0), sig(None), sig(float("nan"))] == [
        "26.1", "0.224", "-0.000668", "1235", "0", "–", "–"
    ]  # fmt: skip
    assert [dec(0.4956), dec(0.0), dec(21.37, 1), dec(None)] == ["0.496", "0.000", "21.4", "–"]


def test_tables(tmp_path, example, capsys):
    folder = _ship64(tmp_path, example)
    assert shipped_tables.main(["--dir", str(folder), "--figures", ""]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    # the missing reports are named on stderr and have no rows or columns
    assert "class_g1.json" in err and "class_g4.json" in err and "class_g2.json" not in err
    assert "| guidance 1 |" not in out and "guidance 4" not in out
    # 1. generation
    assert ("| unconditional | 1000 | 26.1 | 0.224 (1000 / 3444) | 0.171 | -0.000668 | 0.737 | 0.177 | – "
            "| 0.496 (0.030) | 3.02 | 0.000 |") in out  # fmt: skip
    assert (
        "| guidance 2 | 800 | 12.3 | 0.272 (800 / 3444) | 0.0432 | 0.000123 | 0.811 | 0.444 | 0.812 | – | 2.50 | 0.012 |"
        in out
    )
    assert "accuracy on the 3444 real test cells: 0.981" in out
    # 2. class mix
    assert "| neutrophil | 0.517 | 0.193 |" in out and "| basophil | 0.000 | 0.071 |" in out
    assert "Total variation 0.496 (floor 0.030)" in out
    # 3. agreement per class: one column per class-conditional report there
    assert "| class | guidance 2 |" in out
    assert "| basophil | 0.500 |" in out and "| platelet | 0.850 |" in out and "| **all** | **0.812** |" in out
    # 4. inpainting per family, with the family's morphology (offset 0.3: mean 0.3 + 0.35 + 0.11 = 0.76)
    assert "| box | 150 | 21.4 | 0.765 | 0.0123 | 0.0457 | 5.68 (1.23) | 0.0345 | 0.700 | 0.600 | 0.76 (0.05) |" in out
    assert (
        "| nucleus | 150 | 22.4 | 0.765 | 0.0247 | 0.0457 | 6.68 (1.23) | 0.0345 | 0.700 | 0.600 | 0.66 (0.05) |" in out
    )
    # 5. morphology per setting x feature: mean over the classes measured (unconditional: 6 of 8, mean index 4)
    assert "| unconditional | 6 / 8 | 1.40 (0.05) | 1.42 (0.05) |" in out
    assert "| guidance 2 | 8 / 8 | 0.85 (0.05) | 0.87 (0.05) |" in out
    assert "| nucleus inpainting | 8 / 8 | 0.55 (0.05) |" in out
    assert "| setting | classes | nucleus area | cell area |" in out
    # ... and per class x setting, mean over features (+ 0.11); basophil has no unconditional cells
    assert "| class | unconditional | guidance 2 | nucleus inpainting |" in out
    assert "| basophil | – | 0.61 (0.05) | 0.31 (0.05) |" in out
    assert "| platelet | 1.81 (0.05) | 1.31 (0.05) | 1.01 (0.05) |" in out
    assert "![" not in out  # --figures "": no figures


def test_only_unconditional_and_none(tmp_path, example, capsys):
    folder = tmp_path / "ship64"
    folder.mkdir()
    (folder / "uncond.json").write_text(json.dumps(example))  # the example as it is: no morphology section
    assert shipped_tables.main(["--dir", str(folder), "--figures", ""]) == 0
    out = capsys.readouterr().out
    assert "| unconditional | 1000 | 26.1 |" in out and "| ig | 0.343 | 0.171 |" in out
    assert "Class-conditional" not in out and "Inpainting" not in out and "Morphology" not in out
    assert shipped_tables.main(["--dir", str(tmp_path / "empty"), "--figures", ""]) == 1
    assert "no report" in capsys.readouterr().err


def test_figures(tmp_path, example, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    folder = _ship64(tmp_path, example)
    for i, name in enumerate(["uncond", "inpaint_g1"]):  # class_g2.png is not there: no panel
        Image.new("RGB", (130, 130), (200, 100 + 50 * i, 150)).save(folder / f"{name}.png")
    figures = tmp_path / "figures"
    assert shipped_tables.main(["--dir", str(folder), "--figures", str(figures)]) == 0
    captured = capsys.readouterr()
    assert "class_g2.png is not there" in captured.err
    samples, heatmap = figures / "ship64_samples.png", figures / "morphology_w1.png"
    assert samples.is_file() and heatmap.is_file()
    with Image.open(samples) as image:
        assert image.width > 1.5 * image.height  # two panels side by side
    assert f"![ship64_samples]({samples.as_posix()})" in captured.out
    assert f"![morphology_w1]({heatmap.as_posix()})" in captured.out
    panels = shipped_tables._sample_panels(shipped_tables.load_reports(folder), folder)
    assert [title for title, _ in panels] == ["unconditional", "inpainting, box masks"]


def test_morphology_histograms_from_the_kept_cells(tmp_path, example, capsys):
    """NAME.npz beside the reports -> morphology_histograms.png, the inpainting report's nucleus cells only."""
    pytest.importorskip("matplotlib")
    import numpy as np

    from celldiff.evaluation.morphology import FEATURES
    from celldiff.evaluation.morphology_cells import cells_archive, save_cells

    folder = _ship64(tmp_path, example)
    rng = np.random.default_rng(1)
    real = {f: rng.normal(0.3, 0.05, 64) for f in FEATURES}
    classes = [f"c{i}" for i in range(8)]
    for name, families in (("uncond", None), ("class_g1", None), ("inpaint_g1", ["box"] * 16 + ["nucleus"] * 16)):
        fake = {f: rng.normal(0.3, 0.05, 32) for f in FEATURES}
        save_cells(cells_archive(real, np.arange(64) % 8, fake, np.arange(32) % 8, classes, "x", families), folder / f"{name}.npz")
    real_cells, settings, names = shipped_tables.histogram_settings(folder)
    assert names == classes and len(real_cells[1]) == 64
    assert list(settings) == ["unconditional (judge's class)", "guidance 1", "nucleus inpainting"]
    assert len(settings["nucleus inpainting"][1]) == 16
    figures = tmp_path / "figures"
    assert shipped_tables.main(["--dir", str(folder), "--figures", str(figures)]) == 0
    assert (figures / "morphology_histograms.png").stat().st_size > 20_000
    assert "![morphology_histograms]" in capsys.readouterr().out
