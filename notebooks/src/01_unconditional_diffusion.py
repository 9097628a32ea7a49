# %% [markdown]
# # Phase 1: unconditional diffusion on blood cells
#
# This notebook walks through the DDPM of celldiff on real PBC cells (Acevedo et al. 2020):
#
# 1. the **forward process** q(x_t | x_0) on real cells at several t,
# 2. the **noise schedules** (alpha-bar and signal-to-noise ratio, linear vs cosine),
# 3. the **loss curve** of a training run,
# 4. a **sample grid** from the EMA weights,
# 5. the **reverse process** of one sample as a strip of intermediate x_t and predicted x_0.
#
# By default it uses the shipped model `weights/celldiff64.safetensors` (its card: `weights/README.md`):
# ONE class-conditional inpainting model at 64 × 64 that also generates unconditionally. With no mask its
# network sees nothing observed (the `full` mask, 31 % of its training masks) and with no label the null
# class (labels were dropped with probability 0.15), so `module.generate(seeds)` is an unconditional DDPM,
# exactly what this notebook needs. `CKPT` in the next cell also takes a Phase 1 checkpoint
# (`runs/phase1/<time>/checkpoints/last.ckpt`) or another weights file; `CKPT = None` first trains
# `configs/demo.yaml` on the bundled sample (a few minutes on a CPU) and uses that.

# %%
# Parameters: edit these.
CKPT = "weights/celldiff64.safetensors"  # a weights file or a DiffusionModule checkpoint (.ckpt); None trains the demo
DATA_DIR = "data/pbc_sample"  # real cells for the forward process (relative to the repository)
DEMO_RUN_DIR = "runs/notebook01/demo"  # where the demo run goes when CKPT is None
DEMO_OVERRIDES: list[str] = []  # extra CLI arguments for the demo training run
SAMPLER, SAMPLING_STEPS = "dpmsolver", 20  # the sample grid and the reverse process (the shipped model's sampler)
NUM_SAMPLES = 16
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

# Run from the repository root whatever directory Jupyter started in.
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
os.chdir(ROOT)
from celldiff.data.imagecache import build_cache, load_cache  # noqa: E402
from celldiff.data.scan import scan_dataset  # noqa: E402
from celldiff.diffusion.schedule import NoiseSchedule  # noqa: E402
from celldiff.images import image_grid  # noqa: E402
from celldiff.training.weights import is_weights_file, load_diffusion_module, read_weights_metadata  # noqa: E402

torch.set_grad_enabled(False)


def show(images, title=None, nrow=None, ax=None, figsize=(8, 8)):
    """Show a batch (N, C, H, W) in [-1, 1] (or uint8) as a grid."""
    grid = image_grid(torch.as_tensor(images), nrow=nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    ax.imshow(grid)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


# %% [markdown]
# ## The model
#
# `load_diffusion_module` reads a weights file (safetensors: tensors and a JSON header) or a Lightning
# checkpoint (`torch.load(weights_only=True)`): nothing is unpickled either way. Without `CKPT`, the demo
# configuration is trained first, exactly as `make demo` does.

# %%
if CKPT is None:
    run_dir = ROOT / DEMO_RUN_DIR
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        cmd = [sys.executable, "-m", "celldiff.cli", "fit", "--config", "configs/demo.yaml", "--run_dir", str(run_dir),
               "--trainer.enable_progress_bar", "false", *DEMO_OVERRIDES]  # fmt: skip
        print(" ".join(cmd))
        subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    CKPT = ckpt
module = load_diffusion_module(CKPT)  # eval mode, on the CPU
hp = module.hparams
print(f"model: {CKPT}")
if is_weights_file(CKPT):  # a weights file holds the EMA weights and says how long they trained
    meta = read_weights_metadata(CKPT)
    seen = int(meta.get("images_seen_total") or meta.get("images_seen") or 0)
    print(f"weights file: {meta['weights']} weights at step {meta.get('global_step')}, {seen:,} training images")
else:
    print(f"checkpoint: {int(module.ema_updates)} EMA updates")
print(f"{hp.image_size} x {hp.image_size}, {hp.beta_schedule} schedule, T = {hp.num_timesteps}, {hp.prediction_type}-prediction, "
      f"U-Net {sum(p.numel() for p in module.unet.parameters()) / 1e6:.2f} M parameters")  # fmt: skip
if hp.class_conditional:
    print(f"class-conditional ({len(hp.class_names)} classes): the samples below use the null class (no label)")
if hp.inpainting:
    masks = json.loads(meta.get("training_masks", "{}")) if is_weights_file(CKPT) else {}
    print("inpainting model: the samples below observe nothing (the 'full' mask)"
          + ("" if not masks or masks.get("full") else "; WARNING: it was not trained with 'full' masks"))  # fmt: skip

# %% [markdown]
# ## 1. The forward process on real cells
#
# q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4). Each row is one
# cell; the columns are t = 0 (the image) up to T - 1 (almost pure noise). With the linear
# schedule the cell is barely visible by t = 500: most of the schedule is spent in high noise.

# %%
scan = scan_dataset(DATA_DIR)
cache = load_cache(scan, hp.image_size) or build_cache(scan, hp.image_size)
rng = np.random.default_rng(SEED)
rows = rng.choice(len(cache.images), size=4, replace=False)
x0 = torch.from_numpy(np.ascontiguousarray(cache.images[rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
T = module.schedule.num_timesteps
ts = [0, T // 20, T // 10, T // 4, T // 2, 3 * T // 4, T - 1]
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SEED))
strip = [module.schedule.q_sample(x0, torch.full((len(x0),), t), noise) for t in ts]
frames = torch.stack(strip, dim=1).flatten(0, 1)  # (cells * len(ts), C, H, W), row = one cell
ax = show(frames.clamp(-1, 1), nrow=len(ts), figsize=(12, 7))
ax.set_title("forward process, columns t = " + ", ".join(map(str, ts)))
print("classes of these cells:", [cache.class_names[cache.labels[r]] for r in rows])

# %% [markdown]
# ## 2. Noise schedules
#
# alpha_bar_t is the fraction of signal variance left at step t; SNR(t) = alpha_bar / (1 - alpha_bar).
# The cosine schedule (Nichol & Dhariwal 2021) destroys information more slowly at the start and
# spends fewer steps at near-pure noise than the linear schedule of Ho et al.

# %%
schedules = {name: NoiseSchedule(name, T) for name in ("linear", "cosine")}
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for name, schedule in schedules.items():
    abar = schedule.alpha_bar.numpy()
    axes[0].plot(abar, label=name)
    axes[1].plot(np.log(abar / (1 - abar)), label=name)
axes[0].set(xlabel="t", ylabel="alpha_bar_t", title="signal left")
axes[1].set(xlabel="t", ylabel="log SNR(t)", title="log signal-to-noise ratio")
for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)

# %% [markdown]
# ## 3. The loss curve
#
# The training loss (per step) and the validation loss (fixed noise, stratified t) of the run that
# produced the checkpoint, from its `metrics.csv` (CSV logger; W&B runs show the same curves on
# their dashboard). The validation loss is also split by timestep range: small t (fine detail) is
# hard in absolute terms but improves quickly; large t is nearly irreducible.
#
# A weights file holds the network, not its training log: for the shipped file the cell shows instead the
# card's quality-along-the-run figure (`docs/results/ship64_curve.png`, docs/results.md: Fréchet and kernel
# distance, precision / recall and class-mix error of 1,000 unconditional samples at each checkpoint).

# %%
import csv  # noqa: E402

metrics_file = Path(CKPT).resolve().parent.parent / "metrics.csv"
card_figure = ROOT / "docs" / "results" / "ship64_curve.png"
shipped = (ROOT / "weights" / "celldiff64.safetensors").resolve()
if is_weights_file(CKPT):
    print(f"{CKPT} is a weights file: it holds no training log (no metrics.csv), so there is no loss curve to plot")
    if Path(CKPT).resolve() == shipped and card_figure.is_file():
        fig, ax = plt.subplots(figsize=(16, 6.5))
        ax.imshow(plt.imread(card_figure))
        ax.axis("off")
        ax.set_title(f"the shipped model along its training run ({card_figure.relative_to(ROOT)}, docs/results.md)")
elif metrics_file.is_file():
    rows_csv = list(csv.DictReader(metrics_file.open()))

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows_csv if r.get(key)]
        return np.array(pts).T if pts else None

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    train = series("train/loss")
    if train is not None:
        axes[0].plot(*train, alpha=0.5, label="train/loss")
    for key in ("val/loss", "val/loss_ema"):
        s = series(key)
        if s is not None:
            axes[0].plot(*s, "o-", label=key)
    axes[0].set(xlabel="step", ylabel="eps MSE", yscale="log", title="loss")
    for key in sorted(k for k in rows_csv[0] if k.startswith("val/loss_t")):
        s = series(key)
        if s is not None:
            axes[1].plot(*s, "o-", label=key.removeprefix("val/loss_"))
    axes[1].set(xlabel="step", ylabel="eps MSE", yscale="log", title="validation loss by timestep range")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
else:
    print(f"no metrics.csv next to the checkpoint ({metrics_file}); the run logged elsewhere (W&B?)")

# %% [markdown]
# ## 4. Samples from the EMA weights
#
# One seeded generator per image: image i depends only on (SEED, i), not on the batch. For the shipped
# model these are its unconditional cells (null class, nothing observed); its card notes that they
# over-draw neutrophils and immature granulocytes and rarely draw lymphocytes and basophils
# (docs/results.md): for a mix like the data's, draw labels from the data's frequencies and generate
# class-conditionally (notebook 03).

# %%
seeds = [SEED * 1_000_003 + i for i in range(NUM_SAMPLES)]
samples = module.generate(seeds, sampler=SAMPLER, steps=SAMPLING_STEPS)
what = "unconditional: null class" if hp.class_conditional else "unconditional"
what += ", nothing observed" if hp.inpainting else ""
show(samples, title=f"{NUM_SAMPLES} samples ({what}), {SAMPLER} {SAMPLING_STEPS} steps, EMA weights")
real = torch.from_numpy(np.ascontiguousarray(cache.images[rng.choice(len(cache.images), NUM_SAMPLES)]))
show(real.permute(0, 3, 1, 2), title="real cells, for comparison");

# %% [markdown]
# ## 5. The reverse process of one sample
#
# Top row: x_t as the sampler walks from noise to the image. Bottom row: the network's prediction of
# x_0 at that step, x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar). The coarse shape (cell
# and nucleus) is decided early; the late steps add texture. The walk is the sample grid's sampler
# (DPM-Solver++ visits 20 timesteps); `sampler="ddpm", steps=None` shows the 1,000-step ancestral walk
# of Ho et al. (about 1,000 network calls).

# %%
trajectory = []
module.generate([seeds[0]], sampler=SAMPLER, steps=SAMPLING_STEPS, callback=lambda state: trajectory.append(
    (state["t"], state["x_t"][0].clone(), state["x0_pred"][0].clone())))  # fmt: skip
picks = np.unique(np.linspace(0, len(trajectory) - 1, min(10, len(trajectory))).round().astype(int))
xt = torch.stack([trajectory[i][1] for i in picks])
x0_pred = torch.stack([trajectory[i][2] for i in picks])
ax = show(torch.cat([xt.clamp(-1, 1), x0_pred.clamp(-1, 1)]), nrow=len(picks), figsize=(14, 4))
ax.set_title(f"{SAMPLER} reverse process, t = " + ", ".join(str(trajectory[i][0]) for i in picks) + "  (top: x_t, bottom: predicted x_0)")
