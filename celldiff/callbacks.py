"""Callbacks: sample grids to loggers and the run directory, prediction files, the saved split.

This is (with cli.py) the only place that knows about ranks: sampling is sharded across ranks and
gathered with a collective that every rank calls; only file writes and logger calls sit behind
``trainer.is_global_zero``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
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


def labelled_rows(rows: list[tuple[str, np.ndarray]], margin: int = 90) -> np.ndarray:
    """Stack image rows (H, W, 3) vertically with a text label left of each (PIL's built-in font)."""
    from PIL import ImageDraw

    width = max(r.shape[1] for _, r in rows)
    out = []
    for label, row in rows:
        canvas = Image.new("RGB", (margin + width, row.shape[0]), (255, 255, 255))
        canvas.paste(Image.fromarray(row), (margin, 0))
        ImageDraw.Draw(canvas).text((4, row.shape[0] // 2 - 5), label[: margin // 6], fill=(0, 0, 0))
        out.append(np.asarray(canvas))
    return np.concatenate(out)


def _load_pngs(paths: list[Path]) -> Tensor:
    """Read image files into a (N, 3, H, W) uint8 tensor."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


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
        elif isinstance(logger, CSVLogger) and Path(logger.log_dir).resolve() != Path(trainer.default_root_dir).resolve():
            # A CSV log cannot hold images: put the PNG next to metrics.csv (the run directory's
            # samples/ already has it when the log is in the run directory).
            save_png(image, Path(logger.log_dir) / key / f"step{trainer.global_step:07d}.png")


def sharded_generate(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    seeds: list[int],
    labels: list[int],
    known: Tensor | None = None,
    mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Generate ``len(seeds)`` images, each rank drawing every world_size-th one, then gather.

    Every rank must call this (it ends in an all_gather). Image i depends only on seeds[i] (and
    known[i], mask[i] when inpainting).
    """
    world, rank = trainer.world_size, trainer.global_rank
    n = len(seeds)
    per_rank = math.ceil(n / world)
    mine = [min(i, n - 1) for i in range(rank, per_rank * world, world)]  # pad with a repeat
    batch = {"label": torch.tensor([labels[i] for i in mine], device=pl_module.device)}
    if mask is not None:
        batch["image"] = known[mine].to(pl_module.device)
        batch["mask"] = mask[mine].to(pl_module.device)
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
        sampler: ``ddpm``, ``ddim`` or ``dpmsolver``; default: the model's sampler.
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


class InpaintingPanels(L.Callback):
    """Every N epochs, inpaint fixed validation cells, log panels and masked-region metrics.

    The first ``num_images`` validation images with their fixed evaluation masks are inpainted
    with the EMA weights; ``val_inpaint/{mse,psnr,ssim,seam}`` (inside the mask, see
    ``celldiff.metrics``) are logged, and a panel (masked input | inpainted | original, one row per
    cell) goes to the loggers and to ``<run_dir>/samples/inpaint_epochXXXX.png``.

    Args:
        every_n_epochs: Run at the end of every N-th training epoch (0 disables).
        num_images: Validation images to inpaint.
        seed: Seed of the sampling noise.
        sampler: ``ddpm``, ``ddim`` or ``dpmsolver``; default: the model's.
        steps: Reverse steps; default: the model's.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, seed: int = 0, sampler: str | None = None, steps: int | None = None
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self.sampler = sampler
        self.steps = steps

    def _validation_batch(self, trainer: L.Trainer) -> dict[str, Tensor] | None:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "datasets", {}).get("val")
        if dataset is None or len(dataset) == 0 or getattr(dataset, "masker", None) is None:
            return None
        batch = dataset.get_batch(np.arange(min(self.num_images, len(dataset))))
        return datamodule.on_after_batch_transfer(batch, 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from celldiff.metrics import inpainting_metrics

        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if self.every_n_epochs <= 0 or not ((epoch + 1) % self.every_n_epochs == 0 or last):
            return
        batch = self._validation_batch(trainer)
        if batch is None:
            return
        n = len(batch["image"])
        seeds = [self.seed * 1_000_003 + i for i in range(n)]
        images = sharded_generate(
            trainer, pl_module, seeds, batch["label"].tolist(), known=batch["image"], mask=batch["mask"],
            sampler=self.sampler, steps=self.steps,
        )  # fmt: skip
        truth, mask = batch["image"].to(images.device), batch["mask"].to(images.device)
        metrics = inpainting_metrics(images, truth, mask)
        for name, values in metrics.items():  # identical on every rank: no sync needed
            pl_module.log(f"val_inpaint/{name}", values.mean(), rank_zero_only=True)
        if trainer.is_global_zero:
            panel = torch.stack([truth * (1 - mask), images, truth], dim=1).flatten(0, 1)
            grid = image_grid(panel, nrow=3)
            name = f"inpaint_epoch{epoch:04d}_step{trainer.global_step:07d}.png"
            save_png(grid, Path(trainer.default_root_dir) / "samples" / name)
            caption = f"epoch {epoch}: masked input | inpainted (EMA) | original; PSNR in mask {metrics['psnr'].mean():.2f} dB"
            log_image(trainer, "inpainting", grid, caption)


class PredictionWriter(BasePredictionWriter):
    """Write predictions as PNG files and, at the end, a grid.png.

    Generation (Phase 1/3): ``sample_00012.png`` (or ``eosinophil_00012.png`` for a class-
    conditional model) per image and a grid of all of them.

    Inpainting (Phase 2): per input image ``<stem>_inpainted[_j].png`` (the model's output),
    ``<stem>_panel.png`` (masked input | sample(s) | original) and, for a user's own images,
    ``<stem>_fullres[_j].png`` at the input's resolution with every known pixel equal to the input.
    grid.png stacks the first panels.

    If predict fails, the files this run wrote (and the config.yaml saved beside them) are removed
    again, so the same command can be retried with the same ``--output_dir``; files that were there
    before are never touched. Stopped by SIGTERM or Ctrl-C, it stops after the current batch and keeps
    the complete files written so far (``STOP.message`` says how many, for the final line).

    Args:
        output_dir: Directory for the PNG files.
        nrow: Images per row of grid.png; default about sqrt(N).
        max_grid_panels: Panels stacked in grid.png when inpainting.
    """

    def __init__(self, output_dir: str, nrow: int | None = None, max_grid_panels: int = 16) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.nrow = nrow
        self.max_grid_panels = max_grid_panels
        self._dir_existed = self.output_dir.is_dir()
        self._before = set(os.listdir(self.output_dir)) if self._dir_existed else set()
        self.written: list[Path] = []

    def _save(self, array: np.ndarray, path: Path) -> None:
        save_png(array, path)
        self.written.append(path)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_predict_batch_end(trainer, pl_module, *args, **kwargs)
        if trainer.received_sigterm:  # Lightning's predict loop never checks: stop after this batch's files
            raise SIGTERMException

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        images = len({p for p in self.written if p.suffix == ".png"})
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            STOP.message = (
                f"predict wrote {images} complete image file(s) to {self.output_dir} before stopping (no grid.png);"
                f" to rerun, choose a new --output_dir or delete {self.output_dir}"
            )
            return
        # A failure: remove what this run created, so the retry finds the directory as it was.
        for path in set(self.written):
            with contextlib.suppress(OSError):
                path.unlink()
        if self.output_dir.is_dir():
            for path in self.output_dir.glob("config*.yaml"):
                if path.name not in self._before:
                    with contextlib.suppress(OSError):
                        path.unlink()
            if not self._dir_existed:
                with contextlib.suppress(OSError):
                    self.output_dir.rmdir()  # only if empty

    @staticmethod
    def _class_name(pl_module: L.LightningModule, label: int | None) -> str | None:
        names = getattr(pl_module.hparams, "class_names", None)
        return names[label] if names and label is not None and 0 <= label < len(names) else None

    def file_name(self, pl_module: L.LightningModule, index: int, label: int | None) -> str:
        name = self._class_name(pl_module, label)
        if name and getattr(pl_module.hparams, "class_conditional", False):
            return f"{name}_{index:05d}.png"
        return f"sample_{index:05d}.png"

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if "mask" in prediction:
            self._write_inpainting(pl_module, prediction)
            return
        images = tensor_to_uint8(prediction["images"]).permute(0, 2, 3, 1).cpu().numpy()
        labels = prediction.get("label")
        for k, index in enumerate(prediction["index"].tolist()):
            label = int(labels[k]) if labels is not None else None
            self._save(images[k], self.output_dir / self.file_name(pl_module, index, label))

    def _write_inpainting(self, pl_module: L.LightningModule, prediction: dict[str, Any]) -> None:
        from celldiff.user_images import paste_full_resolution

        samples = tensor_to_uint8(prediction["images"]).cpu()  # (B, K, C, H, W)
        known, mask = prediction["known"].cpu(), prediction["mask"].cpu().float()
        masked_input = tensor_to_uint8(known * (1 - mask))  # what the model sees: grey where missing
        originals = tensor_to_uint8(known)
        labels = prediction.get("label")
        paths = prediction.get("path")
        sample_labels = prediction.get("sample_labels")
        for i, index in enumerate(prediction["index"].tolist()):
            if paths is not None:
                stem = Path(paths[i]).stem
            else:
                label = int(labels[i]) if labels is not None else None
                stem = f"{self._class_name(pl_module, label) or 'cell'}_{index:05d}"
            k = samples.shape[1]
            for j in range(k):
                suffix = f"_{j}" if k > 1 else ""
                if sample_labels is not None:  # completed as a chosen class
                    as_class = self._class_name(pl_module, int(sample_labels[j])) or str(int(sample_labels[j]))
                    repeats = int((sample_labels == sample_labels[j]).sum())
                    position = int((sample_labels[:j] == sample_labels[j]).sum())
                    suffix = f"_as_{as_class}" + (f"_{position}" if repeats > 1 else "")
                out = samples[i, j].permute(1, 2, 0).numpy()
                self._save(out, self.output_dir / f"{stem}_inpainted{suffix}.png")
                if paths is not None:
                    full = paste_full_resolution(paths[i], prediction["mask_path"][i], out)
                    self._save(full, self.output_dir / f"{stem}_fullres{suffix}.png")
            panel = torch.cat([masked_input[i : i + 1], samples[i], originals[i : i + 1]])
            self._save(image_grid(panel, nrow=len(panel)), self.output_dir / f"{stem}_panel.png")
            if sample_labels is not None:
                names = ["masked"] + [self._class_name(pl_module, int(c)) or str(int(c)) for c in sample_labels] + ["original"]
                (self.output_dir / f"{stem}_panel.txt").write_text(" | ".join(names) + "\n")
                self.written.append(self.output_dir / f"{stem}_panel.txt")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()  # every rank has written its files
        if not trainer.is_global_zero:
            return
        panels = sorted(self.output_dir.glob("*_panel.png"))[: self.max_grid_panels]
        if panels:
            rows = [np.asarray(Image.open(p).convert("RGB")) for p in panels]
            width = max(r.shape[1] for r in rows)
            rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
            self._save(np.concatenate(rows), self.output_dir / "grid.png")
            print(f"celldiff: wrote inpainting results and {len(panels)} panels in grid.png to {self.output_dir}")
            return
        files = sorted(
            (p for p in self.output_dir.glob("*.png") if re.search(r"_(\d+)\.png$", p.name)),
            key=lambda p: int(re.search(r"_(\d+)\.png$", p.name).group(1)),
        )
        if not files:
            return
        prefixes = [p.name.rsplit("_", 1)[0] for p in files]
        names = getattr(pl_module.hparams, "class_names", None) or []
        if getattr(pl_module.hparams, "class_conditional", False) and set(prefixes) <= set(names):
            # One labelled row per class, in the order they were requested.
            order = list(dict.fromkeys(prefixes))
            rows = []
            for name in order:
                group = [p for p, prefix in zip(files, prefixes, strict=True) if prefix == name]
                images = _load_pngs(group)
                rows.append((name, image_grid(images, nrow=len(group))))
            self._save(labelled_rows(rows), self.output_dir / "grid.png")
            print(f"celldiff: wrote {len(files)} images and grid.png (one row per class) to {self.output_dir}")
            return
        images = _load_pngs(files)
        self._save(image_grid(images, self.nrow), self.output_dir / "grid.png")
        print(f"celldiff: wrote {len(files)} images and grid.png to {self.output_dir}")


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


class _StopRecord:
    """What stopped a command (SIGTERM or Ctrl-C) and what it left, for ``celldiff.cli.main``'s last line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.signal: str | None = None  # "SIGTERM" or "SIGINT" (Ctrl-C)
        self.hard = False  # a KeyboardInterrupt went through (a second Ctrl-C, or one outside a loop)
        self.saved_step: int | None = None  # fit: the step last.ckpt holds after the stop
        self.message: str | None = None  # predict: what was written
        self.graceful = False  # a Lightning loop is running that stops at the next step/batch on its own
        self.command: str | None = None  # the celldiff subcommand
        self.run_dir: str | None = None  # its run directory (fit) or output directory (predict, evaluate)


STOP = _StopRecord()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class GracefulStop(L.Callback):
    """Ctrl-C stops like SIGTERM: at the end of the current step (fit) or batch (validate, test, predict).

    Lightning turns SIGTERM into a flag that its loops check after each step; a Ctrl-C (SIGINT) would
    instead raise ``KeyboardInterrupt`` wherever the process is, so Lightning can save nothing
    consistent. While a loop runs, this callback makes the first Ctrl-C set the same flag (then
    ``SaveOnSigterm`` writes ``last.ckpt`` at that step and ``celldiff`` exits 130 with the resume
    command); a second Ctrl-C stops at once. Lightning restores the previous SIGINT handler when the
    loop ends. It also records in ``STOP`` what stopped the run, for the CLI's last line.
    """

    def _install(self, trainer: L.Trainer) -> None:
        STOP.graceful = True
        if not _main_thread() or trainer.received_sigterm:
            return

        def on_sigint(signum: int, frame: Any) -> None:
            STOP.signal = "SIGINT"
            trainer._signal_connector.received_sigterm = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            if trainer.is_global_zero:
                what = "step" if trainer.training else "batch"
                print(f"\ncelldiff: Ctrl-C: stopping after the current {what} (Ctrl-C again stops at once)", file=sys.stderr)

        signal.signal(signal.SIGINT, on_sigint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        STOP.graceful = False
        if isinstance(exception, KeyboardInterrupt):
            STOP.signal, STOP.hard = "SIGINT", True
        elif isinstance(exception, SIGTERMException) and STOP.signal is None:
            STOP.signal = "SIGTERM"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STOP.graceful = False


class SaveOnSigterm(L.Callback):
    """``last.ckpt`` always holds the last step: on SIGTERM (pre-emption, ``scancel``, ``kill``), Ctrl-C and at the end.

    On SIGTERM (and, with ``GracefulStop``, on the first Ctrl-C), Lightning finishes the current
    optimizer step and raises ``SIGTERMException`` on every rank; this callback writes the checkpoint
    from that exact state (all ranks take part, rank 0 writes; a Ctrl-C meanwhile is ignored), so a run
    stopped between periodic checkpoints loses nothing; ``celldiff`` then exits with status 143
    (SIGTERM) or 130 (Ctrl-C) and says how to resume. At the end of training it also saves when the
    last step is not a multiple of the checkpoint interval.
    """

    def _save(self, trainer: L.Trainer, why: str) -> None:
        checkpoint = trainer.checkpoint_callback
        if getattr(checkpoint, "_last_global_step_saved", None) == trainer.global_step:
            STOP.saved_step = trainer.global_step
            return  # ModelCheckpoint has just written this step
        dirpath = getattr(checkpoint, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        STOP.saved_step = trainer.global_step
        if checkpoint is not None and hasattr(checkpoint, "_last_global_step_saved"):
            checkpoint._last_global_step_saved = trainer.global_step
        if trainer.is_global_zero:
            print(f"celldiff: {why}: saved {path} at step {trainer.global_step}", file=sys.stderr)

    _started = False  # the training loop has begun (before it, e.g. in data preparation, there is nothing to save)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "end of training")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training and self._started:
            why = "Ctrl-C" if STOP.signal == "SIGINT" else "SIGTERM"
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
            try:  # a Ctrl-C now would only cut the checkpoint short (the old one would survive, but be older)
                self._save(trainer, why)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)


class CheckpointReadError(Exception):
    """A checkpoint file that cannot be read: truncated, corrupt or not a checkpoint (reported as one line)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, no permission); the previous file is intact."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_beside(path: Path) -> Path:
    # Hidden and ending in .tmp: never taken for a checkpoint (Lightning's "last" lookup wants last*.ckpt).
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash, a full disk or a kill while saving leaves the previous file intact (the rename is
    atomic on one file system); the temporary file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
            raise CheckpointWriteError(
                err.errno, f"could not write {path} ({err}); the previous file, if any, is intact"
            ) from None
        raise
    _fsync_dir(path.parent)


def _is_corrupt_checkpoint_error(err: BaseException) -> bool:
    import pickle
    import zipfile

    text = str(err)
    if isinstance(err, (EOFError, zipfile.BadZipFile)):
        return True
    if isinstance(err, pickle.UnpicklingError):
        return "Weights only load failed" not in text  # that one is about what the file holds, not its bytes
    return isinstance(err, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text)


def check_checkpoint_file(path: str | Path) -> None:
    """Raise ``CheckpointReadError`` if ``path`` is not a whole torch zip file (cheap: reads its directory only)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            whole = any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointReadError(f"{path} is not a readable checkpoint (truncated or corrupt: {err})") from None
    if not whole:
        raise CheckpointReadError(f"{path} is not a readable checkpoint (a zip file without torch data)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, except that a checkpoint is written beside its target and renamed.

    Lightning's writes through an fsspec transaction whose temporary file lies in the system temp
    folder and is then copied over the target: a full disk or a crash during the copy leaves a
    truncated ``last.ckpt`` in place of the good one. Here the checkpoint goes to a temporary file in
    the same directory, is fsynced and ``os.replace``d over the target (see ``atomic_torch_save``).
    Remote paths (``s3://`` ...) keep Lightning's behaviour. Loading a truncated or corrupt file raises
    ``CheckpointReadError`` (one line from the CLI) instead of a zip-reader traceback.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:
            if _is_corrupt_checkpoint_error(err):
                raise CheckpointReadError(f"{path} is not a readable checkpoint (truncated or corrupt: {err})") from None
            raise


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``save_last="link"`` replaces ``last.ckpt`` atomically.

    (Lightning's removes ``last.ckpt`` first and then links or copies: a crash in between leaves no
    ``last.ckpt``, or a partial copy.) Checkpoints themselves are written by ``AtomicCheckpointIO``.
    Its state in checkpoints is stored under ``ModelCheckpoint``'s key, so old runs resume alike.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            tmp = _temp_beside(Path(linkpath))
            try:
                try:
                    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                except OSError:  # no symlinks (Windows without the right): copy, still atomically
                    shutil.copyfile(filepath, tmp)
                    with open(tmp, "rb+") as file:
                        os.fsync(file.fileno())
                os.replace(tmp, linkpath)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(Path(linkpath).parent)
        trainer.strategy.barrier()


class RNGState(L.Callback):
    """Save every rank's RNG states (torch, CUDA, numpy, random) in checkpoints and restore them.

    Data order, augmentation and training masks draw from these generators, so a run resumed
    from an epoch-end checkpoint continues exactly as the uninterrupted run would have (the noise
    and timesteps of the diffusion loss are a function of the step already).
    """

    @staticmethod
    def _states() -> dict[str, Any]:
        import random

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
        import random

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


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its metrics.csv.

    (Lightning's deletes an existing metrics.csv; a resumed run would lose its history.)
    """

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            from lightning.pytorch.loggers.csv_logs import ExperimentWriter

            class _AppendingWriter(ExperimentWriter):
                def _check_log_dir_exists(self) -> None:
                    if self._fs.isfile(self.metrics_file_path):
                        import csv

                        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                            self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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
