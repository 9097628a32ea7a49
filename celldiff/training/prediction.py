"""``celldiff predict``'s files: one PNG per image (or per inpainted sample), panels, and grid.png.

grid.png is built from the images this writer wrote, kept in memory (uint8, with their index and
label) and gathered from every rank at the end: never read back from the files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from celldiff.data.user_images import paste_full_resolution
from celldiff.images import image_grid, labelled_rows, to_uint8
from celldiff.images import save_png as _save_png
from celldiff.training.stopping import STOP


def _gather(items: list[Any], world_size: int) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (all ranks must call it under DDP)."""
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


class PredictionWriter(BasePredictionWriter):
    """Write predictions as PNG files and, at the end, a grid.png.

    Generation (Phase 1/3): ``sample_00012.png`` (or ``eosinophil_00012.png`` for a class-
    conditional model) per image and a grid of all of them in index order (for a class-conditional
    model one labelled row per class, in the order the classes were requested).

    Inpainting (Phase 2): per input image ``<stem>_inpainted[_j].png`` (the model's output),
    ``<stem>_panel.png`` (masked input | sample(s) | original) and, for a user's own images,
    ``<stem>_fullres[_j].png`` at the input's resolution with every known pixel equal to the input.
    grid.png stacks the first ``max_grid_panels`` panels (by file name).

    If predict fails, the files this run wrote (and the config.yaml saved beside them) are removed
    again, so the same command can be retried with the same ``--output_dir``; files that were there
    before are never touched. Stopped by SIGTERM or Ctrl-C, it stops after the current batch and keeps
    the complete files written so far (``STOP.message`` says how many, for the final line).

    Args:
        output_dir: Directory for the PNG files.
        nrow: Images per row of grid.png when generating; default about sqrt(N).
        max_grid_panels: Panels stacked in grid.png when inpainting.
    """

    def __init__(self, output_dir: str, nrow: int | None = None, max_grid_panels: int = 16) -> None:
        super().__init__(write_interval="batch")
        if (nrow is not None and nrow < 1) or max_grid_panels < 1:
            raise ValueError(f"PredictionWriter: nrow={nrow}, max_grid_panels={max_grid_panels}: expected >= 1 (nrow may be null)")
        self.output_dir = Path(output_dir)
        self.nrow = nrow
        self.max_grid_panels = max_grid_panels
        self._dir_existed = self.output_dir.is_dir()
        self._before = set(os.listdir(self.output_dir)) if self._dir_existed else set()
        self.written: list[Path] = []
        self.images: list[tuple[int, int | None, np.ndarray]] = []  # generated: (index, label, (H, W, 3) uint8)
        self.panels: list[tuple[str, np.ndarray]] = []  # inpainting: (file name, (H, W', 3) uint8)

    def _save(self, array: np.ndarray, path: Path) -> None:
        _save_png(array, path)
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
        """Write a batch's files. ``prediction``: ``images`` (B, C, H, W) in [-1, 1], ``index`` (B,),
        ``label`` (B,) if any; inpainting: ``images`` (B, K, C, H, W), ``known``, ``mask`` (see ``predict_step``)."""
        if "mask" in prediction:
            self._write_inpainting(pl_module, prediction)
            return
        images = to_uint8(prediction["images"]).permute(0, 2, 3, 1).cpu().numpy()
        labels = prediction.get("label")
        for k, index in enumerate(prediction["index"].tolist()):
            label = int(labels[k]) if labels is not None else None
            self._save(images[k], self.output_dir / self.file_name(pl_module, index, label))
            self.images.append((index, label, images[k]))

    def _write_inpainting(self, pl_module: L.LightningModule, prediction: dict[str, Any]) -> None:
        samples = to_uint8(prediction["images"]).cpu()  # (B, K, C, H, W)
        known, mask = prediction["known"].cpu(), prediction["mask"].cpu().float()
        masked_input = to_uint8(known * (1 - mask))  # what the model sees: grey where missing
        originals = to_uint8(known)
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
            panel = image_grid(torch.cat([masked_input[i : i + 1], samples[i], originals[i : i + 1]]), nrow=k + 2)
            self._save(panel, self.output_dir / f"{stem}_panel.png")
            self.panels.append((f"{stem}_panel.png", panel))
            if sample_labels is not None:
                names = ["masked"] + [self._class_name(pl_module, int(c)) or str(int(c)) for c in sample_labels] + ["original"]
                (self.output_dir / f"{stem}_panel.txt").write_text(" | ".join(names) + "\n")
                self.written.append(self.output_dir / f"{stem}_panel.txt")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank's first panels (by name) and its images reach rank 0; only it writes grid.png. A
        # distributed sampler may give an item to two ranks: the same file, kept once.
        panels = dict(_gather(sorted(self.panels, key=lambda p: p[0])[: self.max_grid_panels], trainer.world_size))
        images = {item[0]: item for item in _gather(self.images, trainer.world_size)}
        if not trainer.is_global_zero:
            return
        if panels:
            rows = [panels[name] for name in sorted(panels)[: self.max_grid_panels]]
            width = max(r.shape[1] for r in rows)
            rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
            self._save(np.concatenate(rows), self.output_dir / "grid.png")
            print(f"celldiff: wrote inpainting results and {len(rows)} panels in grid.png to {self.output_dir}")
        elif images:
            self._write_grid(pl_module, [images[index] for index in sorted(images)])

    def _write_grid(self, pl_module: L.LightningModule, images: list[tuple[int, int | None, np.ndarray]]) -> None:
        """grid.png of generated images (index order): one labelled row per class for a class-conditional model."""

        def tiles(group: list[tuple[int, int | None, np.ndarray]]) -> torch.Tensor:  # (N, 3, H, W) uint8
            return torch.from_numpy(np.stack([array for _, _, array in group])).permute(0, 3, 1, 2)

        names = [self._class_name(pl_module, label) for _, label, _ in images]
        if getattr(pl_module.hparams, "class_conditional", False) and all(names):
            rows = []
            for name in dict.fromkeys(names):  # the classes in the order they were requested
                group = [item for item, other in zip(images, names, strict=True) if other == name]
                rows.append((str(name), image_grid(tiles(group), nrow=len(group))))
            self._save(labelled_rows(rows), self.output_dir / "grid.png")
            print(f"celldiff: wrote {len(images)} images and grid.png (one row per class) to {self.output_dir}")
            return
        self._save(image_grid(tiles(images), self.nrow), self.output_dir / "grid.png")
        print(f"celldiff: wrote {len(images)} images and grid.png to {self.output_dir}")
