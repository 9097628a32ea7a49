"""Per-cell morphology values of an evaluation (``morphology_cells.npz``) and their per-class histograms.

``celldiff evaluate --morphology true`` writes, beside ``metrics.json``, every real test cell's and every
generated cell's features (``celldiff.evaluation.morphology.FEATURES``, NaN where segmentation failed) with
the class each is compared under, so that the distributions behind the W1 table can be drawn and re-used
without segmenting again. The file is a plain ``np.savez_compressed`` archive of numeric and string arrays:
it loads with ``allow_pickle=False``.

Keys: ``classes`` (the class names, label order), ``real_class`` / ``fake_class`` (int), ``real_<feature>`` /
``fake_<feature>`` (float32), ``fake_family`` (inpainting: each completion's mask family, else empty) and
``grouping`` (how the generated cells got their class: requested, the judge's, or the completed cell's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from celldiff.evaluation.morphology import FEATURES

HISTOGRAM_FEATURES = ("nucleus_area", "cell_diameter", "nc_ratio", "nucleus_solidity", "nucleus_lobes", "nucleus_red")
LABELS = {
    "nucleus_area": "nucleus area (fraction of image)", "cell_area": "cell area (fraction of image)",
    "nc_ratio": "nucleus / cell area", "nucleus_solidity": "nucleus solidity", "nucleus_lobes": "nucleus lobes",
    "cell_diameter": "cell diameter (fraction of side)",
}  # fmt: skip


def cells_archive(real: Mapping[str, np.ndarray], real_class: np.ndarray, fake: Mapping[str, np.ndarray],
                  fake_class: np.ndarray, classes: Sequence[str], grouping: str,
                  families: Sequence[str] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The arrays of ``morphology_cells.npz`` from ``morphology_features`` outputs and the classes compared."""
    out: dict[str, np.ndarray] = {
        "classes": np.array(list(classes), dtype=str),
        "grouping": np.array(grouping, dtype=str),
        "real_class": np.asarray(real_class, dtype=np.int64),
        "fake_class": np.asarray(fake_class, dtype=np.int64),
        "fake_family": np.array(list(families or []), dtype=str),
    }
    for name in FEATURES:
        out[f"real_{name}"] = np.asarray(real[name], dtype=np.float32)
        out[f"fake_{name}"] = np.asarray(fake[name], dtype=np.float32)
    return out


def save_cells(arrays: Mapping[str, np.ndarray], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def load_cells(path: str | Path) -> dict[str, np.ndarray]:
    """A ``morphology_cells.npz`` as a dict of arrays (never unpickles)."""
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in ("classes", "real_class", "fake_class", *(f"fake_{f}" for f in FEATURES)) if k not in archive]
        if missing:
            raise ValueError(f"{path}: not a morphology_cells.npz (no {missing[0]!r} array)")
        return {key: archive[key] for key in archive.files}


def select(cells: Mapping[str, np.ndarray], family: str | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The generated cells' features and classes, only those of one mask ``family`` when given."""
    keep = np.ones(len(cells["fake_class"]), dtype=bool)
    if family is not None:
        keep = cells["fake_family"] == family
    return {f: cells[f"fake_{f}"][keep] for f in FEATURES}, cells["fake_class"][keep]


def histogram_figure(
    real: tuple[Mapping[str, np.ndarray], np.ndarray],
    settings: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]],
    classes: Sequence[str],
    path: str | Path,
    features: Sequence[str] = HISTOGRAM_FEATURES,
    bins: int = 24,
) -> Path:
    """Per-class histograms: one row per class, one column per feature; the real cells filled, each setting a line.

    Args:
        real: (features, classes) of the real reference cells.
        settings: ``{name: (features, classes)}`` of generated cells, drawn in order (e.g. unconditional,
            guidance 1 / 2 / 4, nucleus inpainting).
        classes: Class names, label order.
        path: The image file.
        features: The columns (``FEATURES`` names); ``nucleus_lobes`` gets one bin per count.
        bins: Bins of the continuous features, over the real cells' 1st-99th percentile range (widened by
            a sixth either side); values outside the range are counted in the edge bins.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"histogram_figure: unknown feature {unknown[0]!r}; expected one of {', '.join(FEATURES)}")
    real_values, real_class = real
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(len(classes), len(features), figsize=(2.6 * len(features), 1.9 * len(classes)), squeeze=False)
    for j, feature in enumerate(features):
        finite = real_values[feature][np.isfinite(real_values[feature])]
        if feature == "nucleus_lobes":
            edges = np.arange(0.5, 6.5, 1.0)
        elif finite.size:
            lo, hi = np.percentile(finite, [1, 99])
            pad = (hi - lo) / 6 or 0.5
            edges = np.linspace(lo - pad, hi + pad, bins + 1)
        else:
            edges = np.linspace(0, 1, bins + 1)
        for i, name in enumerate(classes):
            ax = axes[i, j]
            values = real_values[feature][real_class == i]
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(np.clip(values, edges[0], edges[-1]), edges, density=True, color="0.8")
            for k, (fake_values, fake_class) in enumerate(settings.values()):
                values = fake_values[feature][fake_class == i]
                values = values[np.isfinite(values)]
                if values.size >= 3:
                    ax.hist(np.clip(values, edges[0], edges[-1]), edges, density=True, histtype="step", linewidth=1.2,
                            color=colours[k % len(colours)])  # fmt: skip
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(LABELS.get(feature, feature.replace("_", " ") + " (0-255)"), fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color="0.8")] + [
        plt.Line2D([], [], color=colours[k % len(colours)]) for k in range(len(settings))
    ]
    fig.legend(handles, ["real test cells", *settings], loc="upper center", ncol=min(6, 1 + len(settings)), fontsize=8,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / max(1, len(classes))))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

