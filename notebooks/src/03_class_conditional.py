# %% [markdown]
# # Phase 3: class-conditional generation and inpainting
#
# A learned label embedding is added to the timestep embedding; during training labels are dropped
# to a null class (p = 0.1), so the same network also gives the unconditional prediction and
# classifier-free guidance can mix them: ε = ε_u + s (ε_c − ε_u).
#
# 1. samples per class at several guidance scales,
# 2. the same noise under each label,
# 3. class-conditional nucleus inpainting: one cell, its nucleus masked, completed as each class,
# 4. fidelity by guidance scale: a cell classifier's accuracy on generated cells and the Fréchet
#    distance in its features.
#
# Set the checkpoints in the next cell; without them the notebook trains the two Phase 3 demo
# configs first (a few minutes each on a CPU).

# %%
# Parameters: edit these.
CLASS_CKPT = None  # configs/phase3.yaml checkpoint, or None to train configs/demo_phase3.yaml
INPAINT_CKPT = None  # configs/phase3_inpaint.yaml checkpoint, or None to train the demo
DATA_DIR = "data/pbc_sample"
SPLIT_FILE = None  # the inpainting run's split.json (test cells the model never saw)
DEMO_RUN_ROOT = "runs/notebook03"
DEMO_OVERRIDES: list[str] = []
CLASSIFIER_OVERRIDES: list[str] = []  # extra CLI arguments for the demo classifier run
GUIDANCE_SCALES = [0.0, 1.0, 2.0, 4.0]
PER_CLASS = 4
CLASSIFIER_CKPT = None  # configs/classifier.yaml checkpoint, or None to train the demo classifier
EVAL_SAMPLES = 64  # generated cells per guidance scale for the fidelity table
SAMPLER, SAMPLING_STEPS = "ddim", 50
SEED = 0

# %%
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
os.chdir(ROOT)
from celldiff.data.datamodule import CellDataModule  # noqa: E402
from celldiff.images import image_grid  # noqa: E402
from celldiff.training.module import DiffusionModule  # noqa: E402

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
model = DiffusionModule.load_from_checkpoint(CLASS_CKPT, map_location="cpu").eval()
inpainter = DiffusionModule.load_from_checkpoint(INPAINT_CKPT, map_location="cpu").eval()
NAMES = list(model.hparams.class_names)
print(f"classes: {NAMES}\nguidance scales: {GUIDANCE_SCALES}")


def rows_figure(rows, titles, row_labels, figsize):
    fig, axes = plt.subplots(1, len(rows), figsize=figsize)
    for ax, row, title in zip(axes, rows, titles, strict=True):
        ax.imshow(image_grid(row, nrow=PER_CLASS))
        ax.set_title(title)
        ax.set_yticks([(i + 0.5) * row.shape[-1] * 1.06 for i in range(len(row_labels))], row_labels)
        ax.set_xticks([])
    return fig


# %% [markdown]
# ## 1. Samples per class at several guidance scales
#
# Each panel: one row per class, PER_CLASS samples; the same seeds in every panel. Scale 0 is the
# unconditional model (rows differ only by noise), 1 the plain conditional model, and larger
# scales push towards the features that distinguish the class (and away from diversity).

# %%
labels = torch.arange(len(NAMES)).repeat_interleave(PER_CLASS)
seeds = [SEED * 1_000_003 + (i % PER_CLASS) for i in range(len(labels))]  # same noise in every row
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
ax.set_xticks([(i + 0.5) * (same_noise.shape[-1] + 2) for i in range(len(NAMES))], NAMES, rotation=30)
ax.set_yticks([])
ax.set_title("one noise seed under each label (guidance 2)");

# %% [markdown]
# ## 3. Class-conditional nucleus inpainting
#
# Test cells with their nucleus masked (the stain-based nucleus mask of Phase 2), completed as
# their own class and as each of the other classes: a counterfactual grid. The known pixels are
# the observation exactly; only the nucleus changes.

# %%
size = inpainter.hparams.image_size
dm = CellDataModule(DATA_DIR, image_size=size, masks="nucleus", split_file=SPLIT_FILE)
dm.prepare_data()
dm.setup("test")
test = dm.datasets["test"]
picks = [int(next(i for i in range(len(test)) if test.labels[test.indices[i]] == c)) for c in (2, 4, 6)]
batch = dm.on_after_batch_transfer(test.get_batch(picks), 0)
rows = []
for i in range(len(picks)):
    n = len(NAMES)
    condition = {
        "class_labels": torch.arange(n),
        "known": batch["image"][i : i + 1].expand(n, -1, -1, -1),
        "mask": batch["mask"][i : i + 1].expand(n, -1, -1, -1),
    }
    out = inpainter.generate([SEED] * n, condition, sampler=SAMPLER, steps=SAMPLING_STEPS, guidance_scale=2.0)
    masked = batch["image"][i : i + 1] * (1 - batch["mask"][i : i + 1])
    rows.append(torch.cat([masked, out, batch["image"][i : i + 1]]))
fig, ax = plt.subplots(figsize=(15, 5))
ax.imshow(image_grid(torch.cat(rows), nrow=len(NAMES) + 2))
ax.set_xticks([(i + 0.5) * (size + 2) for i in range(len(NAMES) + 2)], ["masked", *NAMES, "original"], rotation=30)
ax.set_yticks([(i + 0.5) * (size + 2) for i in range(len(picks))],
              [f"a real {NAMES[int(batch['label'][i])]}" for i in range(len(picks))])  # fmt: skip
ax.set_title("nucleus masked, completed as each class (guidance 2)");

# %% [markdown]
# ## 4. Fidelity of the generated cells, by guidance scale
#
# `celldiff evaluate` in the notebook: for each guidance scale, EVAL_SAMPLES cells (balanced over
# the classes, fixed seed) are judged by the cell-type classifier: its accuracy on the generated
# cells per requested class (does a generated eosinophil look like an eosinophil?) and the Fréchet
# distance per class in its feature space, next to the real-vs-real floor at the same n.
# With the demo checkpoints and the 320-image sample these are rough figures (tiny n).

# %%
from celldiff.evaluation.judge import load_judge  # noqa: E402
from celldiff.evaluation.run import run_evaluation  # noqa: E402

if CLASSIFIER_CKPT is None:
    CLASSIFIER_CKPT = train_demo("configs/demo_classifier.yaml", "classifier", CLASSIFIER_OVERRIDES)
classifier = load_judge(CLASSIFIER_CKPT)
eval_dm = CellDataModule(DATA_DIR, image_size=model.hparams.image_size)
table = []
for scale in GUIDANCE_SCALES:
    model.hparams.guidance_scale = scale
    m = run_evaluation(model, eval_dm, classifier, Path(DEMO_RUN_ROOT) / f"eval_guidance_{scale}",
                       num_samples=EVAL_SAMPLES, seed=SEED, sampler=SAMPLER, steps=SAMPLING_STEPS)  # fmt: skip
    row = {"guidance": scale, "accuracy": m["classifier"]["accuracy"], "FD": m["frechet_distance"],
           "floor": m["frechet_distance_floor"], "precision": m["precision"], "recall": m["recall"]}  # fmt: skip
    row.update({f"acc {k}": v for k, v in m["classifier"]["per_class_accuracy"].items()})
    table.append(row)
print(f"n = {EVAL_SAMPLES} generated cells per scale")
for row in table:
    print("  ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(GUIDANCE_SCALES, [r["accuracy"] for r in table], "o-", label="classifier accuracy on generated cells")
ax.set(xlabel="guidance scale", ylabel="accuracy", ylim=(0, 1))
ax.legend();
