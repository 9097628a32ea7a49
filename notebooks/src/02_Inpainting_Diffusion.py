# %% [markdown]
# # Phase 2: inpainting diffusion on blood cells
#
# The inpainting model sees `cat(x_t, masked image, mask)` (7 channels) and predicts ε (or v); at
# sampling the known pixels are replaced by the forward-noised observation after every reverse
# step, so the output equals the observation exactly outside the mask.
#
# This notebook shows, on real test cells:
#
# 1. every mask family (box, brush, centre, half, outpaint, nucleus),
# 2. several samples per input (diversity),
# 3. the reverse process of one inpainting,
# 4. masked-region metrics by mask family for this model against (a) an unconditional model
#    inpainting by replacement only and (b) a non-learned fill (mean colour of the known ring).
#
# By default both models are the shipped `weights/celldiff64.safetensors` (`weights/README.md`), one
# class-conditional inpainting model at 64 × 64. As the inpainter it sees the observation and the mask,
# with the null class (this notebook is class-agnostic; notebook 03 names the class). As the
# replacement baseline (a) the same network is used **blind**: its observation channels get the `full`
# mask (nothing observed, one of its training masks) and the null class, so it is its own unconditional
# model, and the sampler alone puts the known pixels back after every step, exactly what a Phase 1 model
# does. The comparison then isolates what the observation channels add, with the same weights, sampler
# and seeds on both sides. `PHASE1_CKPT` also takes a Phase 1 (unconditional) checkpoint at the same size.
#
# `INPAINT_CKPT = None` and `PHASE1_CKPT = None` train the two demo configs first (32 × 32, a few
# minutes each on a CPU).

# %%
# Parameters: edit these.
INPAINT_CKPT = "weights/celldiff64.safetensors"  # an inpainting model (weights file or .ckpt); None trains demo_inpaint
PHASE1_CKPT = "weights/celldiff64.safetensors"  # the replacement baseline: an unconditional model, or an
# inpainting model trained with 'full' masks, used blind; None trains configs/demo.yaml (then set INPAINT_CKPT = None too)
DATA_DIR = "data/pbc_sample"  # the test split of this data is inpainted
SPLIT_FILE = None  # the run's split.json; None: the default content-hash split (seed 0), which is the model's
DEMO_RUN_ROOT = "runs/notebook02"
DEMO_OVERRIDES: list[str] = []  # extra CLI arguments for both demo training runs
NUM_CELLS = 16  # test cells per mask family for the metrics
SAMPLER, SAMPLING_STEPS = "dpmsolver", 20  # the shipped model's sampler
SEED = 0

# %%
import json
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
from celldiff.diffusion.samplers import sample  # noqa: E402
from celldiff.evaluation.masked import inpainting_metrics  # noqa: E402
from celldiff.images import image_grid  # noqa: E402
from celldiff.masks.mixture import DEFAULT_MASK_WEIGHTS  # noqa: E402
from celldiff.seeds import generators_from_seeds  # noqa: E402
from celldiff.training.module import nothing_observed  # noqa: E402
from celldiff.training.weights import is_weights_file, load_diffusion_module, read_weights_metadata  # noqa: E402

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
# Weights files and checkpoints alike, nothing unpickled; one module when both name the same file.
inpainter = load_diffusion_module(INPAINT_CKPT)
phase1 = inpainter if Path(PHASE1_CKPT).resolve() == Path(INPAINT_CKPT).resolve() else load_diffusion_module(PHASE1_CKPT)
assert inpainter.hparams.inpainting, "INPAINT_CKPT is not an inpainting model"
SIZE = inpainter.hparams.image_size
assert phase1.hparams.image_size == SIZE, (f"the two models must work at the same image size (INPAINT_CKPT {SIZE} px, "
    f"PHASE1_CKPT {phase1.hparams.image_size} px): for the demo pair set both to None")  # fmt: skip
BLIND = bool(phase1.hparams.inpainting)  # an inpainting model as the baseline: its network sees nothing observed
if BLIND and is_weights_file(PHASE1_CKPT) and not json.loads(read_weights_metadata(PHASE1_CKPT).get("training_masks", "{}")).get("full"):
    print("WARNING: PHASE1_CKPT was not trained with 'full' masks: used blind it is no unconditional model")
print(f"inpainting model: {INPAINT_CKPT} ({SIZE} x {SIZE}, {inpainter.hparams.prediction_type}-prediction)")
print(f"replacement baseline: {PHASE1_CKPT}" + (" used blind (nothing observed, null class)" if BLIND else ""))

# %% [markdown]
# ## Test cells and the mask families
#
# Evaluation masks are fixed per cell (seeded by the cell's cache row), so every model below is
# judged on exactly the same holes. With `DATA_DIR = "../shared/data/pbc64"` (all 17,092 cells at 64 px)
# and no `SPLIT_FILE`, the test split is the shipped model's own (content-hash split, seed 0: 3,444
# cells it never saw). The bundled `data/pbc_sample` (320 originals) has a split of its own: the shipped
# model trained on most of those cells (their 64 px copies are in pbc64), so read its figures as a demo.

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
    """The model inpaints ``batch``: its network sees the observation and the mask (a class-conditional model the
    null class: the class is not told here), and the sampler replaces the known pixels after every step."""
    condition = {**model.network_condition(batch), "class_labels": None}
    return model.generate(seeds, condition=condition, sampler=SAMPLER, steps=SAMPLING_STEPS, **kw)


def replacement_only(model, batch, seeds):
    """Inpainting by replacement alone: the network never sees the observation, the sampler puts it back.

    A Phase 1 (unconditional) model does this in ``generate``. An inpainting model is used blind: its
    observation channels get the 'full' mask (nothing observed) and the null class, i.e. it is run as the
    unconditional model it learnt, and ``sample`` replaces the known pixels as ``generate`` would.
    """
    if not model.hparams.inpainting:
        return inpaint(model, batch, seeds)
    hp = model.hparams
    blind = nothing_observed(len(seeds), hp.image_channels, hp.image_size, model.device)  # no class_labels: null class
    model_fn = model.denoiser.model_fn(model.ema_unet if hp.use_ema else model.unet, blind)
    out = sample(model_fn, model.schedule, batch["image"].shape, method=SAMPLER, steps=SAMPLING_STEPS, eta=hp.ddim_eta,
                 spacing=hp.sampling_spacing, generator=generators_from_seeds(seeds), known=batch["image"].float(),
                 missing_mask=batch["mask"])  # fmt: skip
    return out.clamp(-1, 1)


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
# x_t (top) and the predicted x_0 (bottom) along the reverse process (the notebook's sampler), with the
# known region re-noised to the same t at every step.

# %%
trajectory = []
b = {k: v[:1] for k, v in batches["nucleus"].items()}
inpaint(inpainter, b, [SEED], callback=lambda s: trajectory.append((s["t"], s["x_t"][0].clone(), s["x0_pred"][0].clone())))
picks = np.unique(np.linspace(0, len(trajectory) - 1, min(10, len(trajectory))).round().astype(int))
strip = torch.stack([trajectory[i][1] for i in picks] + [trajectory[i][2] for i in picks]).clamp(-1, 1)
show(strip, nrow=len(picks), figsize=(14, 4),
     title=f"{SAMPLER}, t = " + ", ".join(str(trajectory[i][0]) for i in picks) + " (top x_t, bottom predicted x_0)")  # fmt: skip

# %% [markdown]
# ## Masked-region metrics by mask family
#
# MSE, PSNR and SSIM inside the mask and the seam score (gradient mismatch on the mask boundary;
# lower is better) against the real cell, for:
#
# - **celldiff inpainting**: the 7-channel model with replacement sampling,
# - **replacement only**: an unconditional model (by default the same network used blind, see the top),
#   known pixels replaced at every step,
# - **mean fill**: every missing pixel set to the mean colour of the known pixels next to the hole.
#
# The sample is small (NUM_CELLS per family): read differences of a few tenths of a dB as noise.

# %%
from celldiff.evaluation.baselines import mean_fill  # noqa: E402

methods = {
    "celldiff inpainting": lambda b, s: inpaint(inpainter, b, s),
    "replacement only": lambda b, s: replacement_only(phase1, b, s),
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
