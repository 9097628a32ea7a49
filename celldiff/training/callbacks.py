"""Training callbacks: sample grids and inpainting panels, throughput, RNG states, the saved split.

With ``celldiff.training.prediction`` and ``celldiff.training.stopping`` (and the CLI) the only code
that knows about ranks: the grids' sampling is shared out by ``celldiff.evaluation.sharding`` (every
rank calls it, every rank gets every image); only file writes and logger calls sit behind
``trainer.is_global_zero``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import Tensor

from celldiff.evaluation.masked import inpainting_metrics
from celldiff.evaluation.sharding import generate_sharded
from celldiff.images import image_grid, save_png
from celldiff.seeds import sample_seed


def log_image(trainer: L.Trainer, key: str, image: np.ndarray, caption: str) -> None:
    """Send one (H, W, 3) uint8 image to every logger that can show images. Call on global rank 0 only."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=trainer.global_step, caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")
        elif isinstance(logger, CSVLogger) and Path(logger.log_dir).resolve() != Path(trainer.default_root_dir).resolve():
            # A CSV log cannot hold images: put the PNG next to metrics.csv (the run directory's
            # samples/ already has it when the log is in the run directory).
            save_png(image, Path(logger.log_dir) / key / f"step{trainer.global_step:07d}.png")


class _EveryNEpochs(L.Callback):
    """Generation with the EMA weights at the end of every N-th training epoch (and the last one).

    Args:
        every_n_epochs: Run at the end of every N-th training epoch (0 disables).
        seed: Seed of the sampling noise: the same every time, so the images show training progress.
        sampler: A name of ``celldiff.diffusion.samplers.SAMPLERS``; default: the model's sampler.
        steps: Reverse steps; default: the model's.
    """

    def __init__(self, every_n_epochs: int = 1, seed: int = 0, sampler: str | None = None, steps: int | None = None) -> None:
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.sampler = sampler
        self.steps = steps

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return self.every_n_epochs > 0 and ((epoch + 1) % self.every_n_epochs == 0 or last)

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor]) -> Tensor:
        """Images (N, C, S, S) in [-1, 1] on the module's device, image i from ``sample_seed(seed, i)``; every rank calls it."""
        seeds = [sample_seed(self.seed, i) for i in range(len(batch["label"]))]
        images = generate_sharded(pl_module, seeds, batch, forward_context=trainer.precision_plugin.forward_context,
                                  sampler=self.sampler, steps=self.steps)  # fmt: skip
        return images.to(pl_module.device)


class SampleGrid(_EveryNEpochs):
    """Every N epochs, sample a grid with the EMA weights and log it.

    The grid goes to W&B (image), TensorBoard (image) or, for a CSV log, a PNG next to the log;
    and always to ``<run_dir>/samples/epochXXXX_stepYYYYYYY.png``. A class-conditional model draws
    image i as class ``i % num_classes``.

    Args:
        every_n_epochs: Sample at the end of every N-th training epoch (0 disables).
        num_samples: Images in the grid.
        seed: Seed of the grid's noise: the same seed every time, so grids show training progress.
        sampler: A name of ``celldiff.diffusion.samplers.SAMPLERS``; default: the model's sampler.
        steps: Reverse steps; default: the model's.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_samples: int = 16, seed: int = 0, sampler: str | None = None, steps: int | None = None
    ) -> None:
        super().__init__(every_n_epochs, seed, sampler, steps)
        self.num_samples = num_samples

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        num_classes = max(1, int(getattr(pl_module.hparams, "num_classes", 0) or 0))
        labels = torch.arange(self.num_samples) % num_classes
        images = self._generate(trainer, pl_module, {"label": labels})
        if trainer.is_global_zero:
            grid = image_grid(images)
            epoch = trainer.current_epoch
            name = f"epoch{epoch:04d}_step{trainer.global_step:07d}.png"
            save_png(grid, Path(trainer.default_root_dir) / "samples" / name)
            log_image(trainer, "samples", grid, f"epoch {epoch}, step {trainer.global_step} (EMA weights)")


class InpaintingPanels(_EveryNEpochs):
    """Every N epochs, inpaint fixed validation cells, log panels and masked-region metrics.

    The first ``num_images`` validation images with their fixed evaluation masks (the data module's
    ``fixed_mask_batch``) are inpainted with the EMA weights; ``val_inpaint/{mse,psnr,ssim,seam}``
    (inside the mask, see ``celldiff.evaluation.masked``) are logged, and a panel (masked input |
    inpainted | original, one row per cell) goes to the loggers and to
    ``<run_dir>/samples/inpaint_epochXXXX_stepYYYYYYY.png``.

    Args:
        every_n_epochs: Run at the end of every N-th training epoch (0 disables).
        num_images: Validation images to inpaint.
        sampler: A name of ``celldiff.diffusion.samplers.SAMPLERS``; default: the model's.
        steps: Reverse steps; default: the model's.
        seed: Seed of the sampling noise.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, seed: int = 0, sampler: str | None = None, steps: int | None = None
    ) -> None:
        super().__init__(every_n_epochs, seed, sampler, steps)
        self.num_images = num_images

    def _validation_batch(self, trainer: L.Trainer) -> dict[str, Tensor] | None:
        """The first validation cells with their fixed masks, or None (no masks, no validation split)."""
        datamodule = trainer.datamodule
        fixed_mask_batch = getattr(datamodule, "fixed_mask_batch", None)
        split = getattr(datamodule, "split", None)
        if fixed_mask_batch is None or split is None or not split.val:
            return None
        return fixed_mask_batch("val", np.arange(min(self.num_images, len(split.val))))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        batch = self._validation_batch(trainer)
        if batch is None:
            return
        images = self._generate(trainer, pl_module, {k: batch[k] for k in ("label", "image", "mask")})
        truth, mask = batch["image"].to(images.device), batch["mask"].to(images.device)
        metrics = inpainting_metrics(images, truth, mask)
        for name, values in metrics.items():  # identical on every rank: no sync needed
            pl_module.log(f"val_inpaint/{name}", values.mean(), rank_zero_only=True)
        if trainer.is_global_zero:
            epoch = trainer.current_epoch
            panel = torch.stack([truth * (1 - mask), images, truth], dim=1).flatten(0, 1)
            grid = image_grid(panel, nrow=3)
            name = f"inpaint_epoch{epoch:04d}_step{trainer.global_step:07d}.png"
            save_png(grid, Path(trainer.default_root_dir) / "samples" / name)
            caption = f"epoch {epoch}: masked input | inpainted (EMA) | original; PSNR in mask {metrics['psnr'].mean():.2f} dB"
            log_image(trainer, "inpainting", grid, caption)


class Throughput(L.Callback):
    """Training speed on the progress bar and in the log: images/s (all ranks) and GPU memory.

    Timed on the host over windows of ``window`` steps, so it adds no device synchronisation: the
    asynchronous GPU queue averages out over a window.

    Args:
        window: Steps per measurement.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._last: float | None = None
        self._seconds = 0.0
        self._images = 0
        self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the gap since the last epoch (validation, sampling) is not training time

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        import time

        now = time.perf_counter()
        if self._last is not None:  # the first step of an epoch includes loader start-up: skip it
            self._seconds += now - self._last
            self._images += int(batch["image"].shape[0]) * trainer.world_size
            self._steps += 1
        self._last = now
        if self._steps >= self.window:
            pl_module.log("perf/images_per_sec", self._images / self._seconds, prog_bar=True, rank_zero_only=True)
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                memory = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
                pl_module.log("perf/gpu_max_mem_gib", memory, rank_zero_only=True)
            self._seconds, self._images, self._steps = 0.0, 0, 0


class RNGState(L.Callback):
    """Save every rank's RNG states (torch, CUDA, numpy, random) in checkpoints and restore them.

    Data order, augmentation and training masks draw from these generators, so a run resumed
    from an epoch-end checkpoint continues exactly as the uninterrupted run would have (the noise
    and timesteps of the diffusion loss are a function of the step already).
    """

    @staticmethod
    def _states() -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # Checkpoints are loaded with weights_only=True: plain tensors and tuples only.
            "numpy": [(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
                      for name, keys, pos, has_gauss, cached in [np.random.get_state()]][0],  # fmt: skip
            "python": random.getstate(),
        }

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = self._states()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)  # every rank saves; rank 0 writes
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("rng_states")
        if not saved or trainer.global_rank >= len(saved):
            return  # another world size: keep the seeded generators
        states = saved[trainer.global_rank]
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(states["python"])


class SaveSplit(L.Callback):
    """Write the data module's train/val/test split to ``<run_dir>/split.json`` (rank 0)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None or getattr(datamodule, "split", None) is None:
            return
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "split.json"
            if not path.exists():
                datamodule.save_split(path)
