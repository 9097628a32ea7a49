# %% [markdown]
# # Phase 2: inpainting diffusion on blood cells
#
# The inpainting model sees `cat(x_t, masked image, mask)` (7 channels) and predicts ε; at
# sampling the known pixels are replaced by the forward-noised observation after every reverse
# step, so the output equals the observation exactly outside the mask.
#
# This notebook shows, on real test cells:
#
# 1. every mask family (box, brush, centre, half, outpaint, nucleus),
# 2. several samples per input (diversity),
# 3. the reverse process of one inpainting,
# 4. masked-region metrics by mask family for this model against (a) a Phase 1 (unconditional)
#    model inpainting by replacement only and (b) a non-learned fill (mean colour of the known
#    ring).
#
# Set the checkpoints in the next cell. Without them, the notebook trains the two demo configs
# first (a few minutes each on a CPU).

# %%
# Parameters: edit these.
INPAINT_CKPT = None  # a Phase 2 checkpoint (configs/phase2.yaml), or None to train demo_inpaint
PHASE1_CKPT = None  # a Phase 1 checkpoint at the same image size, or None to train demo
DATA_DIR = "data/pbc_sample"  # the test split of this data is inpainted
SPLIT_FILE = None  # the run's split.json, so the test cells are the ones the model never saw
DEMO_RUN_ROOT = "runs/notebook02"
DEMO_OVERRIDES: list[str] = []  # extra CLI arguments for both demo training runs
NUM_CELLS = 16  # test cells per mask family for the metrics
SAMPLER, SAMPLING_STEPS = "ddim", 50
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
from celldiff.evaluation.masked import inpainting_metrics  # noqa: E402
from celldiff.images import image_grid  # noqa: E402
from celldiff.masks.mixture import DEFAULT_MASK_WEIGHTS  # noqa: E402
from celldiff.training.module import DiffusionModule  # noqa: E402

torch.set_grad_enabled(False)


def show(images, title=None, nrow=None, figsize=(10, 6)):
    grid = image_grid(torch.as_tensor(images), nrow=nrow)
    _, ax = plt.subplots(figsize=figsize)
    ax.imshow(grid)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def train_demo(config: str, name: str) -> Path:
    run_dir = ROOT / DEMO_RUN_ROOT / name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        cmd = [sys.executable, "-m", "celldiff.cli", "fit", "--config", config, "--run_dir", str(run_dir),
               "--trainer.enable_progress_bar", "false", *DEMO_OVERRIDES]  # fmt: skip
        print(" ".join(cmd))
        subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return ckpt


if INPAINT_CKPT is None:
    INPAINT_CKPT = train_demo("configs/demo_inpaint.yaml", "inpaint")
    SPLIT_FILE = SPLIT_FILE or str(Path(INPAINT_CKPT).parent.parent / "split.json")
if PHASE1_CKPT is None:
    PHASE1_CKPT = train_demo("configs/demo.yaml", "phase1")
inpainter = DiffusionModule.load_from_checkpoint(INPAINT_CKPT, map_location="cpu").eval()
phase1 = DiffusionModule.load_from_checkpoint(PHASE1_CKPT, map_location="cpu").eval()
assert inpainter.hparams.inpainting, "INPAINT_CKPT is not an inpainting model"
SIZE = inpainter.hparams.image_size
assert phase1.hparams.image_size == SIZE, "the two models must work at the same image size"
print(f"inpainting model: {INPAINT_CKPT} ({SIZE} x {SIZE})\nphase 1 model: {PHASE1_CKPT}")

# %% [markdown]
# ## Test cells and the mask families
#
# Evaluation masks are fixed per cell (seeded by the cell's cache row), so every model below is
# judged on exactly the same holes.

# %%
datamodules = {}
INPAINT_FAMILIES = [name for name, weight in DEFAULT_MASK_WEIGHTS.items() if weight > 0]  # 'full' is off by default
for family in INPAINT_FAMILIES:
    dm = CellDataModule(DATA_DIR, image_size=SIZE, masks=family, split_file=SPLIT_FILE)
    dm.prepare_data()
    dm.setup("test")
    datamodules[family] = dm
test_set = datamodules["box"].datasets["test"]
# a seeded draw over the whole test split (it is ordered by class: its first cells are all basophils)
rows = np.sort(np.random.default_rng(SEED).permutation(len(test_set))[:NUM_CELLS])
print(f"{len(test_set)} test cells; using {len(rows)} per family")

batches = {}
for family, dm in datamodules.items():
    batches[family] = dm.on_after_batch_transfer(dm.datasets["test"].get_batch(rows), 0)
first = batches["box"]["image"][:4]
masked_examples = torch.cat([(b["image"][:4] * (1 - b["mask"][:4])) for b in batches.values()])
show(torch.cat([first, masked_examples]), nrow=4, figsize=(6, 12),
     title="top: cells; then one row per family: " + ", ".join(INPAINT_FAMILIES))  # fmt: skip

# %% [markdown]
# ## Inpainting every family, several samples per input

# %%


def inpaint(model, batch, seeds, **kw):
    condition = model.network_condition(batch)
    return model.generate(seeds, condition=condition, sampler=SAMPLER, steps=SAMPLING_STEPS, **kw)


SAMPLES = 3
for family in ("brush", "nucleus"):
    b = {k: v[:4] for k, v in batches[family].items()}
    outs = [inpaint(inpainter, b, [SEED * 100 + 10 * j + i for i in range(4)]) for j in range(SAMPLES)]
    panel = torch.stack([b["image"] * (1 - b["mask"]), *outs, b["image"]], dim=1).flatten(0, 1)
    show(panel, nrow=SAMPLES + 2, figsize=(8, 7),
         title=f"{family}: masked input | {SAMPLES} samples | original")  # fmt: skip

# %% [markdown]
# ## The reverse process of one inpainting
#
# x_t (top) and the predicted x_0 (bottom) along the DDPM reverse process, with the known region
# re-noised to the same t at every step.

# %%
trajectory = []
b = {k: v[:1] for k, v in batches["nucleus"].items()}
inpainter.generate([SEED], condition=inpainter.network_condition(b), sampler="ddpm", steps=None,
                   callback=lambda s: trajectory.append((s["t"], s["x_t"][0].clone(), s["x0_pred"][0].clone())))  # fmt: skip
picks = np.linspace(0, len(trajectory) - 1, 8).round().astype(int)
strip = torch.stack([trajectory[i][1] for i in picks] + [trajectory[i][2] for i in picks]).clamp(-1, 1)
show(strip, nrow=len(picks), figsize=(14, 4),
     title="t = " + ", ".join(str(trajectory[i][0]) for i in picks) + " (top x_t, bottom predicted x_0)")  # fmt: skip

# %% [markdown]
# ## Masked-region metrics by mask family
#
# MSE, PSNR and SSIM inside the mask and the seam score (gradient mismatch on the mask boundary;
# lower is better) against the real cell, for:
#
# - **celldiff inpainting**: the 7-channel model with replacement sampling,
# - **phase 1 + replacement**: the unconditional model, known pixels replaced at every step,
# - **mean fill**: every missing pixel set to the mean colour of the known pixels next to the hole.
#
# The sample is small (NUM_CELLS per family): read differences of a few tenths of a dB as noise.

# %%
from celldiff.evaluation.baselines import mean_fill  # noqa: E402

methods = {
    "celldiff inpainting": lambda b, s: inpaint(inpainter, b, s),
    "phase 1 + replacement": lambda b, s: inpaint(phase1, b, s),
    "mean fill": lambda b, s: mean_fill(b["image"], b["mask"]),
}
results = []
for family, batch in batches.items():
    seeds = [SEED * 1_000_003 + int(r) for r in rows]
    for name, method in methods.items():
        out = method(batch, seeds)
        metrics = inpainting_metrics(out, batch["image"], batch["mask"])
        results.append({"family": family, "method": name, **{k: float(v.mean()) for k, v in metrics.items()}})

header = f"{'family':<10} {'method':<24} {'MSE':>8} {'PSNR dB':>8} {'SSIM':>7} {'seam':>7}"
print(header + "\n" + "-" * len(header))
for r in results:
    print(f"{r['family']:<10} {r['method']:<24} {r['mse']:>8.4f} {r['psnr']:>8.2f} {r['ssim']:>7.3f} {r['seam']:>7.4f}")
print(f"\n{len(rows)} test cells per family, {SAMPLER} {SAMPLING_STEPS} steps, seed {SEED}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
families = list(batches)
for k, name in enumerate(methods):
    psnr = [next(r["psnr"] for r in results if r["family"] == f and r["method"] == name) for f in families]
    ssim = [next(r["ssim"] for r in results if r["family"] == f and r["method"] == name) for f in families]
    x = np.arange(len(families)) + (k - 1) * 0.27
    axes[0].bar(x, psnr, width=0.27, label=name)
    axes[1].bar(x, ssim, width=0.27, label=name)
for ax, title in zip(axes, ("PSNR inside the mask (dB)", "SSIM inside the mask"), strict=True):
    ax.set_xticks(np.arange(len(families)), families)
    ax.set_title(title)
    ax.legend()
