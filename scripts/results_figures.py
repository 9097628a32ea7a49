"""The inpainting comparison figure of docs/results.md: the same test cells and masks, every method.

    python scripts/results_figures.py [--runs runs/results] [--out docs/results/inpainting_comparison.png]
    python scripts/results_figures.py --phase2-run phase2_192k --seed-run seed_inpaint_192k --phase1-run "" \
        --out docs/results/inpainting_comparison_192k.png        # the 192 k-image models, no Phase 1 column

For each mask family (box, brush, nucleus) a few test cells (the first of ``celldiff evaluate``'s
seeded draw, so the cells the tables measured) are shown as rows: masked input, celldiff Phase 2,
the seed recipe, Phase 1 + replacement, blur fill, mean fill, original. The learned methods sample
with DDIM 50 from seed 0 here (the seed recipe's own sampler, DDPM 1000, is in the tables); images
are upscaled 3× (nearest) for viewing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from celldiff.data.datamodule import CellDataModule
from celldiff.data.datasets import MaskAssigner
from celldiff.evaluation.baselines import blur_fill, mean_fill
from celldiff.images import image_grid, labelled_rows, save_png
from celldiff.seeds import sample_seed
from celldiff.training.module import DiffusionModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/results"))
    parser.add_argument("--data-dir", default="../shared/data/pbc64")
    parser.add_argument("--cells", type=int, default=4, help="test cells per mask family")
    parser.add_argument("--out", type=Path, default=Path("docs/results/inpainting_comparison.png"))
    parser.add_argument("--phase2-run", default="phase2", help="the celldiff Phase 2 run under --runs")
    parser.add_argument("--seed-run", default="seed_inpaint", help="the seed-recipe run under --runs")
    parser.add_argument("--phase1-run", default="phase1", help='the Phase 1 run (replacement column); "" for none')
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    load = lambda name: DiffusionModule.load_from_checkpoint(args.runs / name / "checkpoints" / "last.ckpt", map_location="cpu").eval()  # noqa: E731
    models = {"celldiff phase 2": load(args.phase2_run), "seed recipe": load(args.seed_run)}
    if args.phase1_run:
        models["phase 1 + repl."] = load(args.phase1_run)
    methods = ["masked", *models, "blur fill", "mean fill", "original"]
    size = models["celldiff phase 2"].hparams.image_size
    dm = CellDataModule(args.data_dir, image_size=size, split_file=str(args.runs / args.phase2_run / "split.json"),
                        mask_options={"box": {"num_boxes": [1, 1]}})  # fmt: skip
    dm.prepare_data()
    dm.setup("test")
    test = dm.datasets["test"]
    positions = np.random.default_rng(0).permutation(len(test))[: args.cells]  # evaluate's draw, seed 0
    rows = []
    for family in ("box", "brush", "nucleus"):
        batch = test.get_batch(positions)
        known = batch["image"].float() / 127.5 - 1
        mask = MaskAssigner(family, dm.mask_options, dm.mask_seed, deterministic=True)(batch["image"], test.indices[positions]).float()
        seeds = [sample_seed(0, i) for i in range(len(positions))]
        outputs = {"masked": known * (1 - mask), "original": known}
        for name, model in models.items():
            condition = model.network_condition({"image": known, "mask": mask, "label": batch["label"]})
            outputs[name] = model.generate(seeds, condition=condition, sampler="ddim", steps=50)
        outputs["blur fill"], outputs["mean fill"] = blur_fill(known, mask), mean_fill(known, mask)
        for i in range(len(positions)):
            strip = image_grid(torch.stack([outputs[m][i] for m in methods]), nrow=len(methods))
            big = np.asarray(Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST))
            rows.append((f"{family} {dm.class_names[int(batch['label'][i])]}", big))
    header = Image.new("RGB", (rows[0][1].shape[1], 16), (255, 255, 255))
    from PIL import ImageDraw

    step = rows[0][1].shape[1] / len(methods)
    for j, name in enumerate(methods):
        ImageDraw.Draw(header).text((int(j * step) + 4, 2), name, fill=(0, 0, 0))
    figure = labelled_rows([("", np.asarray(header)), *rows], margin=110)
    save_png(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
