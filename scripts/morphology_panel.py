"""The segmentation panel of docs/morphology.md: real cells of every class with their cell and nucleus outlines.

    python scripts/morphology_panel.py [--data-dir data/pbc_sample] [--per-class 4] [--seed 0]
        [--out docs/results/morphology_segmentation.png]

Cells are drawn at random (seeded) from each class folder, decoded at 64 x 64 as the models see them
(``celldiff.data.decode.load_image``: centre crop, bicubic), segmented by
``celldiff.evaluation.morphology`` and drawn upscaled: the cell outline green, the nucleus outline
yellow; each title gives nucleus area / cell area (fractions of the image), N:C ratio, nucleus solidity,
lobe count and cell diameter (fraction of the side). A failed segmentation is titled "failed".
Needs matplotlib (the dev extra).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from celldiff.data.decode import load_image
from celldiff.evaluation.morphology import morphology_features, segment


def _cells(data_dir: Path, per_class: int, size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``per_class`` images of each class folder (seeded draw), as (C * per_class, S, S, 3) uint8."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    images = []
    for name in classes:
        files = sorted(f for f in (data_dir / name).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        picks = rng.choice(len(files), min(per_class, len(files)), replace=False)
        images += [load_image(files[i], size) for i in sorted(picks)]
    return classes, np.stack(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data/pbc_sample"))
    parser.add_argument("--per-class", type=int, default=4, help="cells per class (columns)")
    parser.add_argument("--size", type=int, default=64, help="side the cells are decoded at")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of cells")
    parser.add_argument("--out", type=Path, default=Path("docs/results/morphology_segmentation.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, images = _cells(args.data_dir, args.per_class, args.size, args.seed)
    cell, nucleus = segment(images)
    feats = morphology_features(images)
    columns = args.per_class
    fig, axes = plt.subplots(len(classes), columns, figsize=(2.3 * columns, 2.55 * len(classes)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[i], interpolation="nearest")
        for mask, colour in ((cell[i], "lime"), (nucleus[i], "yellow")):
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        if feats["failed"][i]:
            title = "failed"
        else:
            title = (f"N {feats['nucleus_area'][i]:.3f}  C {feats['cell_area'][i]:.3f}  N:C {feats['nc_ratio'][i]:.2f}\n"
                     f"sol {feats['nucleus_solidity'][i]:.2f}  lobes {feats['nucleus_lobes'][i]:.0f}  "
                     f"d {feats['cell_diameter'][i]:.2f}")  # fmt: skip
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % columns == 0:
            ax.set_ylabel(classes[i // columns], fontsize=9)
    fig.suptitle("Segmentation on real cells at 64 px: cell (green), nucleus (yellow)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    # 256 colours (octree) keep the panel a third of the size, without visible loss.
    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
