"""``CellDataModule``: the data of every command, from a folder or zip of cell images to device batches.

Flow: ``scan_dataset`` (stat only) → ``load_cache`` / ``build_cache`` (every usable image decoded once
into an (N, S, S, 3) uint8 memmap) → ``make_split`` / ``load_split`` → ``CellImageDataset`` per split
(memmap slices, dihedral augmentation, masks) → loaders (``EpochSampler`` for training) → uint8 on
the host, [-1, 1] float32 on the device (``on_after_batch_transfer``). Callbacks and the evaluation
take fixed-mask batches from ``fixed_mask_batch`` and the mask families from ``eval_mask_families``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from celldiff.data.datasets import (
    CellImageDataset,
    EpochSampler,
    MaskAssigner,
    NoiseDataset,
    _Batched,
    collate_batch,
    interleaved_by_class,
    resolve_classes,
)
from celldiff.data.imagecache import CachedData, build_cache, cache_paths, load_cache
from celldiff.data.scan import Scan, resolve_data_dir, scan_dataset
from celldiff.data.split import SPLIT_NAMES, Split, check_fractions, load_split, make_split, save_split, split_indices
from celldiff.data.user_images import UserImageDataset
from celldiff.errors import DataError
from celldiff.images import to_model_range
from celldiff.masks.mixture import MaskSpec, mask_families

MAX_IMAGE_SIZE = 4096
PREDICT_SOURCES = ("noise", *SPLIT_NAMES)
def predicts_with_masks(
    predict_images: str | None, predict_source: str, masks: MaskSpec | None, eval_masks: MaskSpec | None
) -> bool:
    """Whether predict batches carry masks (inpainting), from the data arguments alone (nothing is read).

    True for a user's own images (``predict_images``) and for a split ``predict_source`` with
    evaluation masks (``eval_masks``, else ``masks``); False when predict generates from noise. The
    CLI routes ``--num_samples`` by it before anything is built: samples per masked image when True
    (the model's ``samples_per_image``), else the number of predict items (``num_predict_samples``).
    """
    if predict_images is not None:
        return True
    return predict_source != "noise" and (eval_masks if eval_masks is not None else masks) is not None


class CellDataModule(L.LightningDataModule):
    """PBC cell images for diffusion training: cached uint8 on the host, [-1, 1] on the device.

    Args:
        data_dir: Folder with one folder per cell class, the same nested one level deeper, or a
            ``.zip`` of either (e.g. Mendeley's PBC_dataset_normal_DIB).
        image_size: Side of the square images (centre crop, then resize).
        batch_size: Images per batch for train/val/test.
        num_workers: DataLoader worker processes (persistent when > 0). A batch is one memmap slice
            (~1 ms per 64 images at 64 px), so 0 is usually fastest: workers add a transfer per batch.
        classes: Optional subset of class names; labels index the sorted subset.
        split_fractions: Train/val/test fractions per class, summing to 1.
        split_seed: Seed of the split shuffle.
        split_file: Reuse a split saved by ``save_split`` (a run's ``split.json``).
        cache_dir: Folder for the decoded cache; default ``$CELLDIFF_CACHE_DIR`` or
            ``~/.cache/celldiff``.
        augment: Random flips and 90° rotations of training images. Like the training masks, drawn
            per item from (seed, epoch, position in the epoch's global order) (``EpochSampler``), so
            DDP ranks and workers draw independently and W processes with batch b train like one
            process with batch W x b.
        pin_memory: Pin host batches (only when CUDA is available).
        predict_source: ``"noise"`` (generate; items carry no image) or a split name
            ``"train"`` / ``"val"`` / ``"test"`` (items carry images, classes interleaved).
        num_predict_samples: Number of predict items; for a split source at most this many
            (-1: the whole split). The CLI's ``--num_samples`` sets it unless predict inpaints
            (``predicts_with_masks``).
        predict_seed: Base of each predict item's ``noise_seed``.
        predict_batch_size: Batch size for predict; default ``batch_size``.
        masks: Inpainting masks with every image (Phase 2): a family of
            ``celldiff.masks.mixture.FAMILIES`` (``box``, ``brush``, ``centre``, ``half``,
            ``outpaint``, ``nucleus``), a comma-separated list, or a dict of weights
            (``{box: 1, brush: 2}``); ``null`` = no masks. Random for training, fixed
            per image (seeded by ``mask_seed``) for val/test/predict.
        eval_masks: Mask types of val/test/predict if they differ from ``masks`` (e.g. train on a
            mixture, evaluate on ``nucleus``).
        mask_options: Keyword options per mask family, e.g. ``{box: {num_boxes: [1, 1]}}``.
        mask_seed: Seed of the fixed evaluation masks (another seed, other masks; the same seed,
            the same mask for each cell in every run).
        predict_images: Inpaint a user's own images (any size): a folder of images; needs
            ``predict_masks``. Overrides ``predict_source``.
        predict_masks: Folder of masks with the images' file stems (white = missing, any size).
        predict_classes: Class-conditional predict: class names or ids (``eosinophil,platelet``,
            ``all``). From noise: ``num_predict_samples`` images per class, with the same noise
            under every label. Inpainting: every image completed as each of these classes.
        class_balanced: Draw training images with probability inversely proportional to their
            class's size, so every class is seen equally often (the full PBC data has 1.2k to
            3.3k images per class). An epoch keeps the train split's length; the draws are
            global (the same on every rank), and each rank takes its slice of every batch.
    """

    def __init__(
        self,
        data_dir: str = "data/pbc_sample",
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        classes: list[str] | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        split_file: str | None = None,
        cache_dir: str | None = None,
        augment: bool = True,
        pin_memory: bool = True,
        predict_source: str = "noise",
        num_predict_samples: int = 16,
        predict_seed: int = 0,
        predict_batch_size: int | None = None,
        masks: str | list[str] | dict[str, float] | None = None,
        eval_masks: str | list[str] | dict[str, float] | None = None,
        mask_options: dict[str, dict[str, Any]] | None = None,
        mask_seed: int = 0,
        predict_images: str | None = None,
        predict_masks: str | None = None,
        predict_classes: str | list[str] | None = None,
        class_balanced: bool = False,
    ) -> None:
        super().__init__()
        if (predict_images is None) != (predict_masks is None):
            raise DataError("data.predict_images and data.predict_masks go together: give both folders")
        self.predict_images, self.predict_masks = predict_images, predict_masks
        data_dir = resolve_data_dir(data_dir)
        self.predict_problems: list[str] = []
        self.predict_classes, self.class_balanced = predict_classes, class_balanced
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise DataError(
                f"image_size={image_size}, batch_size={batch_size}, num_workers="
                f"{num_workers}: expected image_size, batch_size ≥ 1, num_workers ≥ 0"
            )
        if image_size > MAX_IMAGE_SIZE:
            raise DataError(
                f"image_size={image_size} is too large: expected at most {MAX_IMAGE_SIZE} (the cache holds "
                f"{3 * image_size**2 / 2**20:,.0f} MiB per image; the PBC images are 360 x 363 px)"
            )
        if predict_batch_size is not None and predict_batch_size < 1:
            raise DataError(f"predict_batch_size={predict_batch_size}: expected ≥ 1 (or null: batch_size)")
        if num_predict_samples == 0 or num_predict_samples < -1:
            raise DataError(
                f"num_predict_samples={num_predict_samples}: expected ≥ 1, or -1 for the whole split of predict_source"
            )
        if predict_source not in PREDICT_SOURCES:
            raise DataError(
                f"predict_source {predict_source!r} is unknown; expected one of {', '.join(PREDICT_SOURCES)}"
            )
        self.save_hyperparameters()
        self.data_dir, self.image_size, self.batch_size = data_dir, image_size, batch_size
        self.num_workers, self.classes, self.cache_dir = num_workers, classes, cache_dir
        self.split_fractions = check_fractions(split_fractions)
        self.split_seed, self.split_file, self.augment = split_seed, split_file, augment
        self.pin_memory, self.predict_source = pin_memory, predict_source
        self.num_predict_samples, self.predict_seed = num_predict_samples, predict_seed
        self.predict_batch_size = predict_batch_size or batch_size
        self._scan: Scan | None = None
        self._scanned_in_prepare = False
        self._prepared: CachedData | None = None  # what prepare_data found or built, in this process
        self._train_seed: int | None = None  # seed of the training order and draws; kept in checkpoints
        self.cached: CachedData | None = None
        self._split: Split | None = None
        self.datasets: dict[str, CellImageDataset] = {}
        self.masks, self.mask_options, self.mask_seed = masks, mask_options, mask_seed
        self.eval_masks = eval_masks if eval_masks is not None else masks
        # Build the maskers now so a bad mask name fails at start-up, not after decoding.
        self.train_masker = MaskAssigner(masks, mask_options) if masks is not None else None
        self.eval_masker = (
            MaskAssigner(self.eval_masks, mask_options, mask_seed, deterministic=True)
            if self.eval_masks is not None
            else None
        )
        self._family_maskers: dict[str, MaskAssigner] = {}  # fixed masks of one family, for fixed_mask_batch

    def _get_scan(self, fresh: bool = False) -> Scan:
        if self._scan is None or fresh:
            scan = scan_dataset(self.data_dir, self.classes)
            if self._scan is not None and scan.class_names != self._scan.class_names:
                raise DataError(
                    f"class folders of {scan.source} changed since the model was "
                    f"built: {list(self._scan.class_names)} → {list(scan.class_names)}"
                )
            self._scan = scan
        return self._scan

    @property
    def class_names(self) -> list[str]:
        """Sorted class names (cheap: folder names only, no decoding)."""
        return list(self._get_scan().class_names)

    @property
    def num_classes(self) -> int:
        return len(self._get_scan().class_names)

    @property
    def split(self) -> Split | None:
        """The train/val/test split, after ``setup``."""
        return self._split

    def save_split(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON; reuse it with ``split_file``."""
        if self._split is None:
            raise RuntimeError("CellDataModule.save_split needs setup() to have run")
        save_split(self._split, path)

    def prepare_data(self) -> None:
        """Scan, and decode the cache if it is missing or stale (Lightning: one process per node decodes).

        Under DDP only that process also re-hashes the files to check the cache (a file rewritten
        with the same size and mtime)."""
        scan = self._get_scan(fresh=True)
        self._scanned_in_prepare = True  # setup in this process reuses the scan
        if getattr(self.trainer, "predicting", False) and not self._predict_needs_cache():
            return
        exists = all(p.exists() for p in cache_paths(scan, self.image_size, self.cache_dir))
        self._prepared = self._load_or_build(scan, look=exists)  # checked: setup in this process takes it as is

    def _load_or_build(self, scan: Scan, look: bool = True) -> CachedData:
        """The current cache of ``scan`` (``look``: try loading it first), decoded if need be, and logged."""
        cached = load_cache(scan, self.image_size, self.cache_dir) if look else None
        reused = cached is not None
        if cached is None:
            cached = build_cache(scan, self.image_size, self.cache_dir)
        rank_zero_info(cached.summary(reused))
        return cached

    def _predict_needs_cache(self) -> bool:
        return self.predict_images is None and self.predict_source != "noise"

    def setup(self, stage: str | None = None) -> None:
        """The cache, the split and the train/val/test datasets (``datasets``); nothing for noise predict."""
        if stage == "predict" and not self._predict_needs_cache():
            return  # generating, or inpainting the user's files: the dataset is not needed
        if self.cached is None and self._prepared is not None:
            self.cached = self._prepared
        if self.cached is None:  # prepare_data was skipped (or ran in another process)
            self.cached = self._load_or_build(self._get_scan(fresh=not self._scanned_in_prepare))
        data = self.cached
        where = f"split file {self.split_file}" if self.split_file else "the split"
        if self._split is None:
            if self.split_file:
                self._split = load_split(self.split_file)
            else:
                self._split = make_split(
                    data.relpaths, data.labels, data.sha256, self.split_fractions, self.split_seed, data.class_names
                )
        rows = split_indices(self._split, data.relpaths, where)
        for name, split_rows in zip(SPLIT_NAMES, rows, strict=True):
            self.datasets[name] = CellImageDataset(
                data.images,
                data.labels,
                split_rows,
                augment=self.augment and name == "train",
                masker=self.train_masker if name == "train" else self.eval_masker,
            )

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, sampler: torch.utils.data.Sampler | None = None
    ) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            _Batched(dataset) if isinstance(dataset, CellImageDataset) else dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=False,  # the training sampler yields whole batches (or one partial batch of a tiny set)
            num_workers=workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def _dataset(self, name: str) -> CellImageDataset:
        if name not in self.datasets:
            raise RuntimeError(f"CellDataModule.{name}_dataloader needs setup() to have run")
        return self.datasets[name]

    @property
    def predict_class_ids(self) -> list[int] | None:
        """``predict_classes`` as class ids (None when not set)."""
        if self.predict_classes is None:
            return None
        return resolve_classes(self.predict_classes, self.class_names)

    @property
    def predict_with_masks(self) -> bool:
        """Whether predict batches carry masks: see ``predicts_with_masks``."""
        return predicts_with_masks(self.predict_images, self.predict_source, self.masks, self.eval_masks)

    @property
    def eval_mask_families(self) -> list[str]:
        """The families of the evaluation masks, in registry order ([] without masks): one evaluation each."""
        return [] if self.eval_masks is None else mask_families(self.eval_masks)

    def fixed_mask_batch(
        self, split: str, positions: Sequence[int] | np.ndarray, family: str | None = None
    ) -> dict[str, torch.Tensor] | None:
        """Images of a split with their fixed evaluation masks, in the model's range (callbacks, evaluation).

        The masks are those the split's loader gives: fixed per cache row by ``mask_seed``, from
        ``eval_masks``, or with ``family`` from that one family (with ``mask_options``), so every run,
        model and baseline inpaints the same cells with the same masks. No augmentation.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            positions: (B,) positions in the split.
            family: One family of ``celldiff.masks.mixture.FAMILIES``; None: the ``eval_masks`` mixture.

        Returns:
            On the CPU: ``image`` (B, 3, S, S) float32 in [-1, 1], ``mask`` (B, 1, S, S) float32
            (1 = missing), ``label`` (B,) int64, ``index`` (B,) int64 cache rows. None when
            ``family`` is None and the data module has no masks.

        Raises:
            RuntimeError: ``setup`` has not run. DataError: an unknown family.
        """
        if family is None:
            masker = self.eval_masker
        else:
            if family not in self._family_maskers:
                self._family_maskers[family] = MaskAssigner(family, self.mask_options, self.mask_seed, True)
            masker = self._family_maskers[family]
        if masker is None:
            return None
        batch = self._dataset(split).with_masker(masker).get_batch(positions)
        return {**batch, "image": to_model_range(batch["image"]), "mask": batch["mask"].float()}

    def train_dataloader(self) -> DataLoader:
        """The training batches: ``EpochSampler`` order, flips/rotations and masks drawn per item.

        The order and every draw are a pure function of (seed, epoch, global position): the seed is
        ``seed_everything``'s (``PL_GLOBAL_SEED``, the seed Lightning's own DistributedSampler uses),
        kept in checkpoints so a resumed run continues the same sequence. Under DDP each rank takes
        its slice of every global batch, so W processes with batch b train like 1 with batch W x b.

        Raises:
            DataError: the train split is empty, or under DDP holds fewer than one batch per process.
        """
        dataset = self._dataset("train")
        n, b = len(dataset), self.batch_size
        if n == 0:
            raise DataError(f"the train split of {self.data_dir} is empty")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if world > 1 and n < world * b:
            raise DataError(
                f"the train split of {self.data_dir} holds {n} images, fewer than one batch of {b} per process on "
                f"{world} processes (a DDP step needs {world * b}); set --data.batch_size to at most {max(1, n // world)}"
                f" or --trainer.devices to at most {max(1, n // b)}"
            )
        if self._train_seed is None:
            self._train_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        weights = None
        if self.class_balanced:
            labels = dataset.labels[dataset.indices]
            weights = 1.0 / np.bincount(labels, minlength=self.num_classes)[labels]
        # A tiny train set (one process, fewer images than a batch) trains on one partial batch.
        sampler = EpochSampler(n, b, self._train_seed, world, rank, weights=weights, drop_last=n >= world * b)
        return self._loader(dataset, b, shuffle=False, sampler=sampler)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the seed of the training order and draws (resume continues the sequence)."""
        return {} if self._train_seed is None else {"train_seed": self._train_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_seed" in state_dict:
            self._train_seed = int(state_dict["train_seed"])

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Predict items: a user's images with masks, noise seeds to generate from, or a split's images.

        Split items carry image (B, 3, S, S) uint8, label, index, noise_seed and, with evaluation
        masks, mask (B, 1, S, S) uint8; classes are interleaved so the first items show every class.
        """
        if self.predict_images is not None:
            user = UserImageDataset(self.predict_images, self.predict_masks, self.image_size, self.predict_seed)
            self.predict_problems = user.problems
            return DataLoader(user, batch_size=self.predict_batch_size, shuffle=False, num_workers=self.num_workers)
        if self.predict_source == "noise":
            if self.num_predict_samples < 1:
                raise DataError(
                    f'num_predict_samples={self.num_predict_samples}: expected ≥ 1 for predict_source "noise"'
                )
            dataset: Dataset = NoiseDataset(
                self.num_predict_samples, self.num_classes, self.predict_seed, self.predict_class_ids
            )
        else:
            source = self._dataset(self.predict_source)
            assert self.cached is not None
            order = interleaved_by_class(self.cached.labels[source.indices], len(self.cached.class_names))
            if self.num_predict_samples >= 0:
                order = order[: self.num_predict_samples]
            dataset = CellImageDataset(
                self.cached.images,
                self.cached.labels,
                source.indices[order],
                predict_seed=self.predict_seed,
                masker=self.eval_masker,
            )
        return self._loader(dataset, self.predict_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: image uint8 -> float32 in [-1, 1], mask uint8 -> float32; predict adds ``target_classes``."""
        # The host ships uint8 (4× less traffic than float32); scaling happens on the device.
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
            if batch["image"].dtype == torch.uint8:
                batch = {**batch, "image": to_model_range(batch["image"])}  # a new tensor: the input stays intact
            if isinstance(batch.get("mask"), torch.Tensor) and batch["mask"].dtype == torch.uint8:
                batch = {**batch, "mask": batch["mask"].float()}
            trainer = self.trainer
            if "mask" in batch and self.predict_classes is not None and trainer is not None and trainer.predicting:
                # Inpaint every image as each requested class (a counterfactual panel per cell).
                ids = torch.tensor(self.predict_class_ids, device=batch["image"].device)
                batch = {**batch, "target_classes": ids}
        return batch
