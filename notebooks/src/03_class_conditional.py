# %% [markdown]
# # Phase 3: class-conditional generation and inpainting
#
# A learned label embedding is added to the timestep embedding; during training labels are dropped
# to a null class (the shipped model: p = 0.15), so the same network also gives the unconditional
# prediction and classifier-free guidance can mix them: ε = ε_u + s (ε_c − ε_u).
#
# 1. samples per class at several guidance scales,
# 2. the same noise under each label,
# 3. class-conditional nucleus inpainting, the counterfactual grid: real test cells with their nucleus
#    masked, each nucleus completed as each of the classes,
# 4. fidelity by guidance scale: the judge's accuracy on the generated cells of section 1 and the
#    Fréchet distance in its features, next to the real-vs-real floor.
#
# By default every model is a shipped weights file (`weights/README.md`): `weights/celldiff64.safetensors`,
# ONE class-conditional inpainting model at 64 × 64, generates (sections 1, 2, 4: no mask, so its network
# sees nothing observed, the `full` mask of its training mixture) and inpaints (section 3), and
# `weights/judge64.safetensors`, the 64 px cell classifier (98 % on the real test cells), judges.
# `CLASS_CKPT = INPAINT_CKPT = CLASSIFIER_CKPT = None` trains the three demo configs first (32 × 32, a
# few minutes each on a CPU).

# %%
# Parameters: edit these.
CLASS_CKPT = "weights/celldiff64.safetensors"  # class-conditional model (weights file or .ckpt); None trains demo_phase3
INPAINT_CKPT = "weights/celldiff64.safetensors"  # class-conditional inpainting model; None trains demo_phase3_inpaint
CLASSIFIER_CKPT = "weights/judge64.safetensors"  # the judge (weights file or .ckpt); None trains demo_classifier
DATA_DIR = "data/pbc_sample"
SPLIT_FILE = None  # the inpainting run's split.json; None: the default content-hash split (seed 0), the shipped model's
DEMO_RUN_ROOT = "runs/notebook03"
DEMO_OVERRIDES: list[str] = []
CLASSIFIER_OVERRIDES: list[str] = []  # extra CLI arguments for the demo classifier run
GUIDANCE_SCALES = [0.0, 1.0, 2.0, 4.0]
PER_CLASS = 4  # samples per class and guidance scale (section 1; section 4 judges them)
COUNTERFACTUAL_CELLS = ["eosinophil", "erythroblast", "lymphocyte", "neutrophil"]  # one real test cell of each
COUNTERFACTUAL_GUIDANCE = 2.0
REAL_PER_CLASS = 100  # real test cells per class: the reference of section 4
SAMPLER, SAMPLING_STEPS = "dpmsolver", 20  # the shipped model's sampler
SEED = 0

# %%
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
os.chdir(ROOT)
from celldiff.data.datamodule import CellDataModule  # noqa: E402
from celldiff.images import image_grid  # noqa: E402
from celldiff.training.weights import load_diffusion_module  # noqa: E402

torch.set_grad_enabled(False)


def train_demo(config: str, name: str, overrides: list[str] | None = None) -> Path:
    run_dir = ROOT / DEMO_RUN_ROOT / name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        cmd = [sys.executable, "-m", "celldiff.cli", "fit", "--config", config, "--run_dir", str(run_dir),
               "--trainer.enable_progress_bar", "false", *(DEMO_OVERRIDES if overrides is None else overrides)]  # fmt: skip
        print(" ".join(cmd))
        subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return ckpt


if CLASS_CKPT is None:
    CLASS_CKPT = train_demo("configs/demo_phase3.yaml", "class")
if INPAINT_CKPT is None:
    INPAINT_CKPT = train_demo("configs/demo_phase3_inpaint.yaml", "inpaint")
    SPLIT_FILE = SPLIT_FILE or str(Path(INPAINT_CKPT).parent.parent / "split.json")
# Weights files and checkpoints alike, nothing unpickled; one module when both name the same file.
model = load_diffusion_module(CLASS_CKPT)
inpainter = model if Path(INPAINT_CKPT).resolve() == Path(CLASS_CKPT).resolve() else load_diffusion_module(INPAINT_CKPT)
assert model.hparams.class_conditional and inpainter.hparams.class_conditional, "both models must be class-conditional"
assert inpainter.hparams.inpainting, "INPAINT_CKPT is not an inpainting model"
NAMES = list(model.hparams.class_names)
print(f"class-conditional model: {CLASS_CKPT} ({model.hparams.image_size} px, label dropout {model.hparams.label_dropout})"
      + (", an inpainting model: it generates with nothing observed" if model.hparams.inpainting else ""))  # fmt: skip
print(f"class-conditional inpainting model: {INPAINT_CKPT}" + (" (the same model)" if inpainter is model else ""))
print(f"classes: {NAMES}\nguidance scales: {GUIDANCE_SCALES}; {SAMPLER} {SAMPLING_STEPS} steps")


def tick(i, size):
    """The centre of tile i of an ``image_grid`` (2 px padding) along one axis."""
    return 2 + i * (size + 2) + size / 2


def rows_figure(rows, titles, row_labels, figsize):
    fig, axes = plt.subplots(1, len(rows), figsize=figsize)
    for j, (ax, row, title) in enumerate(zip(axes, rows, titles, strict=True)):
        ax.imshow(image_grid(row, nrow=PER_CLASS))
        ax.set_title(title)
        ax.set_yticks([tick(i, row.shape[-1]) for i in range(len(row_labels))], row_labels if j == 0 else [])
        ax.set_xticks([])
    return fig


# %% [markdown]
# ## 1. Samples per class at several guidance scales
#
# Each panel: one row per class, PER_CLASS samples; the same seeds in every panel (cell i has seed i).
# Scale 0 is the unconditional model (the null class: the row's label is ignored), 1 the plain
# conditional model, and larger scales push towards the features that distinguish the class (and away
# from diversity). Scales other than 0 and 1 cost two network calls per step.

# %%
labels = torch.arange(len(NAMES)).repeat_interleave(PER_CLASS)
seeds = [SEED * 1_000_003 + i for i in range(len(labels))]  # one seed per cell: section 4 judges them as a set
panels = [model.generate(seeds, {"class_labels": labels}, sampler=SAMPLER, steps=SAMPLING_STEPS, guidance_scale=s)
          for s in GUIDANCE_SCALES]  # fmt: skip
rows_figure(panels, [f"guidance {s}" for s in GUIDANCE_SCALES], NAMES, figsize=(5 * len(GUIDANCE_SCALES), 8));

# %% [markdown]
# ## 2. The same noise under each label
#
# One noise seed, every class (guidance 2): what the label alone changes.

# %%
one_seed = [SEED * 1_000_003 + 123] * len(NAMES)
same_noise = model.generate(one_seed, {"class_labels": torch.arange(len(NAMES))}, sampler=SAMPLER,
                            steps=SAMPLING_STEPS, guidance_scale=2.0)  # fmt: skip
fig, ax = plt.subplots(figsize=(14, 2.5))
ax.imshow(image_grid(same_noise, nrow=len(NAMES)))
ax.set_xticks([tick(i, same_noise.shape[-1]) for i in range(len(NAMES))], NAMES, rotation=30)
ax.set_yticks([])
ax.set_title("one noise seed under each label (guidance 2)");

# %% [markdown]
# ## 3. Class-conditional nucleus inpainting: the counterfactual grid
#
# "This cell's nucleus completed as each class." Each row is a real test cell (one of each class in
# `COUNTERFACTUAL_CELLS`, drawn with the seed) with its nucleus masked (the stain-based nucleus mask of
# Phase 2); the columns complete the nucleus as each of the classes, with the same noise seed in every
# column, so only the label differs. The known pixels are the observation exactly: only the nucleus
# changes. The first column is the masked input and the last the real cell. With
# `DATA_DIR = "../shared/data/pbc64"` and no `SPLIT_FILE` the cells are from the shipped model's test split.

# %%
size = inpainter.hparams.image_size
dm = CellDataModule(DATA_DIR, image_size=size, masks="nucleus", split_file=SPLIT_FILE)
dm.prepare_data()
dm.setup("test")
test = dm.datasets["test"]
test_labels = np.asarray(test.labels)[np.asarray(test.indices)]
rng = np.random.default_rng(SEED)
picks = [int(rng.choice(np.flatnonzero(test_labels == NAMES.index(name)))) for name in COUNTERFACTUAL_CELLS if name in NAMES]
batch = dm.on_after_batch_transfer(test.get_batch(picks), 0)
n, k = len(NAMES), len(picks)
condition = {  # every cell under every label, in one batch: row i, column c = cell i completed as class c
    "class_labels": torch.arange(n).repeat(k),
    "known": batch["image"].repeat_interleave(n, dim=0),
    "mask": batch["mask"].repeat_interleave(n, dim=0),
}
out = inpainter.generate([SEED] * (n * k), condition, sampler=SAMPLER, steps=SAMPLING_STEPS,
                         guidance_scale=COUNTERFACTUAL_GUIDANCE).unflatten(0, (k, n))  # fmt: skip
masked = batch["image"] * (1 - batch["mask"])
grid = torch.cat([masked[:, None], out, batch["image"][:, None]], dim=1).flatten(0, 1)
fig, ax = plt.subplots(figsize=(15, 1.5 * k + 1.2))
ax.imshow(image_grid(grid, nrow=n + 2))
ax.set_xticks([tick(i, size) for i in range(n + 2)], ["masked", *NAMES, "original"], rotation=30)
ax.set_yticks([tick(i, size) for i in range(k)], [f"a real {NAMES[int(batch['label'][i])]}" for i in range(k)])
ax.set_title(f"this cell's nucleus completed as each class ({size} x {size}, guidance {COUNTERFACTUAL_GUIDANCE})");

# %% [markdown]
# ## 4. Fidelity of the generated cells, by guidance scale
#
# The judge (`CLASSIFIER_CKPT`, a cell-type classifier) looks at the cells of section 1 (PER_CLASS per
# class and scale, the same seeds at every scale): its **accuracy** on them per requested class (does a
# generated eosinophil look like an eosinophil?) and the **Fréchet distance** between their features and
# those of REAL_PER_CLASS real test cells per class, next to its **floor**: the same distance for as many
# real test cells (PER_CLASS per class, not in the reference), what a perfect generator would score at this
# n. At guidance 0 the label is ignored (the null class): the accuracy is then the chance level that
# conditioning is measured against, and the judge's labels give the unconditional class mix (whose
# distance to the class-balanced reference also counts its class mix against it). The numbers
# are rough (n = 8 × PER_CLASS per scale); `celldiff evaluate` gives the full report at n ≥ 1,000
# (docs/results.md).

# %%
from celldiff.evaluation.distances import compare_sets, frechet_distance  # noqa: E402
from celldiff.evaluation.judge import (  # noqa: E402
    classifier_report,
    extract_features,
    judge_size_problem,
    judge_view,
    load_judge,
    predicted_classes,
)
from celldiff.images import to_uint8  # noqa: E402

if CLASSIFIER_CKPT is None:
    CLASSIFIER_CKPT = train_demo("configs/demo_classifier.yaml", "classifier", CLASSIFIER_OVERRIDES)
classifier = load_judge(CLASSIFIER_CKPT)  # a weights file or a checkpoint, nothing unpickled
judge_names = classifier.hparams.class_names
assert judge_names is None or list(judge_names) == NAMES, f"the judge knows {judge_names}, the model {NAMES}"
JUDGE_SIZE = classifier.hparams.image_size
problem = judge_size_problem(JUDGE_SIZE, model.hparams.image_size)
assert problem is None, f"CLASSIFIER_CKPT {CLASSIFIER_CKPT}: {problem}"
print(f"judge: {CLASSIFIER_CKPT} ({JUDGE_SIZE} px)")

# The real reference and the floor's cells: test cells at the class model's size, per class in a seeded order.
real_dm = CellDataModule(DATA_DIR, image_size=model.hparams.image_size, split_file=SPLIT_FILE)
real_dm.prepare_data()
real_dm.setup("test")
rows_test = np.asarray(real_dm.datasets["test"].indices)
labels_test = np.asarray(real_dm.cached.labels)[rows_test]
rng = np.random.default_rng(SEED)
reference, floor_pool = [], []
for c in range(len(NAMES)):
    rows_c = rng.permutation(rows_test[labels_test == c])
    keep = min(REAL_PER_CLASS, max(1, len(rows_c) - PER_CLASS))
    reference.extend(rows_c[:keep])
    floor_pool.append(rows_c[keep : keep + 3 * PER_CLASS])


def features(cache_rows):
    images = torch.from_numpy(np.ascontiguousarray(real_dm.cached.images[np.asarray(cache_rows)])).permute(0, 3, 1, 2)
    return extract_features(classifier, judge_view(images, JUDGE_SIZE))


real_feats = features(reference)
floors = []
for draw in range(5):  # PER_CLASS real cells per class (what section 1 generates), against the same reference
    pick = [pool[np.random.default_rng([SEED, draw, c]).permutation(len(pool))[:PER_CLASS]] for c, pool in enumerate(floor_pool)]
    floors.append(frechet_distance(real_feats, features(np.concatenate(pick))))
floor = float(np.mean(floors))

table = []
for scale, panel in zip(GUIDANCE_SCALES, panels, strict=True):
    judged = judge_view(to_uint8(panel), JUDGE_SIZE)
    report = classifier_report(classifier, judged, labels, NAMES)
    sets = compare_sets(real_feats, extract_features(classifier, judged))
    row = {"guidance": scale, "accuracy": report["accuracy"], "FD": sets["frechet_distance"], "floor": floor,
           "precision": sets["precision"], "recall": sets["recall"]}  # fmt: skip
    row.update({f"acc {k}": v for k, v in report["per_class_accuracy"].items()})
    table.append(row)
    if scale == 0:
        mix = np.bincount(predicted_classes(classifier, judged).numpy(), minlength=len(NAMES))
        unconditional_mix = ", ".join(f"{name} {count}" for name, count in zip(NAMES, mix, strict=True))
print(f"n = {len(labels)} generated cells per scale ({PER_CLASS} per class), reference {len(reference)} real test cells, "
      f"floor: {len(NAMES) * PER_CLASS} real test cells (mean of {len(floors)} draws)")  # fmt: skip
for row in table:
    print("  ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))
if 0 in GUIDANCE_SCALES:
    print(f"guidance 0 (null class), the judge's labels: {unconditional_mix}")
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
axes[0].plot(GUIDANCE_SCALES, [r["accuracy"] for r in table], "o-", label="judge's accuracy on generated cells")
axes[0].axhline(1 / len(NAMES), ls=":", c="gray", label="chance")
axes[0].set(xlabel="guidance scale", ylabel="accuracy", ylim=(0, 1.05), title="does a cell look like its class?")
axes[1].plot(GUIDANCE_SCALES, [r["FD"] for r in table], "o-", label="generated vs real")
axes[1].axhline(floor, ls="--", c="gray", label="real-vs-real floor (same n)")
axes[1].set(xlabel="guidance scale", ylabel="Fréchet distance (judge features)", ylim=(0, None), title="how far from real cells?")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
