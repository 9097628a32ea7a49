"""Callbacks: sample grids to loggers and the run directory, prediction files, the saved split.

This is (with cli.py) the only place that knows about ranks: sampling is sharded across ranks and
gathered with a collective that every rank calls; only file writes and logger calls sit behind
``trainer.is_global_zero``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from celldiff.data import tensor_to_uint8


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) uint8, or float in [-1, 1].
        nrow: Images per row; default about sqrt(N).
        padding: Pixels between tiles.

    Returns:
        (H', W', C) uint8 array.
    """
    if images.dtype != torch.uint8:
        images = tensor_to_uint8(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Save an (H, W, 3) uint8 array, writing to a temporary file first so a crash leaves no stub."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def log_image(trainer: L.Trainer, key: str, image: np.ndarray, caption: str) -> None:
    """Send one image to every logger that can show images. Call on global rank 0 only."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=trainer.global_step, caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")
        elif isinstance(logger, CSVLogger):
            # A CSV log cannot hold images: put the PNG next to metrics.csv.
            save_png(image, Path(logger.log_dir) / key / f"step{trainer.global_step:07d}.png")


def sharded_generate(
    trainer: L.Trainer, pl_module: L.LightningModule, seeds: list[int], labels: list[int], **kwargs: Any
) -> Tensor:
    """Generate ``len(seeds)`` images, each rank drawing every world_size-th one, then gather.

    Every rank must call this (it ends in an all_gather). Image i depends only on seeds[i].
    """
    world, rank = trainer.world_size, trainer.global_rank
    n = len(seeds)
    per_rank = math.ceil(n / world)
    mine = [min(i, n - 1) for i in range(rank, per_rank * world, world)]  # pad with a repeat
    batch = {"label": torch.tensor([labels[i] for i in mine], device=pl_module.device)}
    condition = pl_module.network_condition(batch)
    with trainer.precision_plugin.forward_context():
        images = pl_module.generate([seeds[i] for i in mine], condition=condition, **kwargs)
    if world == 1:
        return images
    gathered = pl_module.all_gather(images)  # (world, per_rank, C, H, W)
    order = gathered.transpose(0, 1).reshape(-1, *images.shape[1:])  # i = j * world + r
    return order[:n]


class SampleGrid(L.Callback):
    """Every N epochs, sample a grid with the EMA weights and log it.

    The grid goes to W&B (image), TensorBoard (image) or, for a CSV log, a PNG next to the log;
    and always to ``<run_dir>/samples/epochXXXX_stepYYYYYYY.png``.

    Args:
        every_n_epochs: Sample at the end of every N-th training epoch (0 disables).
        num_samples: Images in the grid.
        seed: Seed of the grid's noise: the same seed every time, so grids show training progress.
        sampler: ``ddpm`` or ``ddim``; default: the model's sampler.
        steps: Reverse steps; default: the model's.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_samples: int = 16, seed: int = 0, sampler: str | None = None, steps: int | None = None
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self.sampler = sampler
        self.steps = steps

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if self.every_n_epochs <= 0 or not ((epoch + 1) % self.every_n_epochs == 0 or last):
            return
        num_classes = max(1, int(getattr(pl_module.hparams, "num_classes", 0) or 0))
        seeds = [self.seed * 1_000_003 + i for i in range(self.num_samples)]
        labels = [i % num_classes for i in range(self.num_samples)]
        images = sharded_generate(trainer, pl_module, seeds, labels, sampler=self.sampler, steps=self.steps)
        if trainer.is_global_zero:
            grid = image_grid(images)
            name = f"epoch{epoch:04d}_step{trainer.global_step:07d}.png"
            save_png(grid, Path(trainer.default_root_dir) / "samples" / name)
            log_image(trainer, "samples", grid, f"epoch {epoch}, step {trainer.global_step} (EMA weights)")


class PredictionWriter(BasePredictionWriter):
    """Write each predicted image as a PNG and, at the end, a grid.png of all of them.

    Args:
        output_dir: Directory for the PNG files.
        nrow: Images per row of grid.png; default about sqrt(N), or num_samples per class.
    """

    def __init__(self, output_dir: str, nrow: int | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.nrow = nrow

    def file_name(self, pl_module: L.LightningModule, index: int, label: int | None) -> str:
        names = getattr(pl_module.hparams, "class_names", None)
        if label is not None and getattr(pl_module.hparams, "class_conditional", False) and names:
            return f"{names[label]}_{index:05d}.png"
        return f"sample_{index:05d}.png"

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Tensor],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        images = tensor_to_uint8(prediction["images"]).permute(0, 2, 3, 1).cpu().numpy()
        labels = prediction.get("label")
        for k, index in enumerate(prediction["index"].tolist()):
            label = int(labels[k]) if labels is not None else None
            save_png(images[k], self.output_dir / self.file_name(pl_module, index, label))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()  # every rank has written its files
        if not trainer.is_global_zero:
            return
        files = sorted(
            (p for p in self.output_dir.glob("*.png") if re.search(r"_(\d+)\.png$", p.name) and p.name != "grid.png"),
            key=lambda p: int(re.search(r"_(\d+)\.png$", p.name).group(1)),
        )
        if not files:
            return
        images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in files])
        save_png(image_grid(images, self.nrow), self.output_dir / "grid.png")
        print(f"celldiff: wrote {len(files)} images and grid.png to {self.output_dir}")


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
