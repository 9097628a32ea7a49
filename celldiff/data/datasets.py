"""Datasets on the cache: cell images with their flips and masks, the training order, noise items.

``CellImageDataset`` serves memmap slices as uint8 batches (one read per batch); ``EpochSampler``
gives the training order and every item's draw key from (seed, epoch, global position), shared out
across DDP ranks; ``MaskAssigner`` gives each image its inpainting mask (random per draw key for
training, fixed per cache row for evaluation); ``NoiseDataset`` is the predict items of generation.
Host batches stay uint8; ``CellDataModule.on_after_batch_transfer`` scales them on the device.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from celldiff.errors import DataError
from celldiff.images import to_model_range
from celldiff.masks.mixture import MASK_TYPES, MaskSampler, MaskSpec
from celldiff.seeds import mix_seed, sample_seed

_AUG_DRAW, _MASK_DRAW = 0xA6, 0x3A  # separate streams derived from one item's key
_ORDER_POSITION = -1  # the epoch order's generator: draw_key of a position no item has


def draw_key(seed: int, epoch: int, position: int) -> int:
    """The key of all random draws (flip/rotation, mask) of the item at ``position`` of an epoch's global order."""
    return mix_seed(seed, epoch, position)


def _gather_chw(images: np.ndarray, rows: np.ndarray, transforms: np.ndarray | None) -> np.ndarray:
    """Rows of an (N, S, S, 3) array as (B, 3, S, S), each under its dihedral transform.

    Transform bits: 1 = swap H/W, 2 = flip H, 4 = flip W; the eight combinations are the eight
    symmetries of the square. numpy views do the flips, so each pixel is copied once after the read.
    """
    size = images.shape[1]
    out = np.empty((len(rows), 3, size, size), dtype=np.uint8)
    if transforms is None:
        out[...] = images[rows].transpose(0, 3, 1, 2)
        return out
    for code in np.unique(transforms):
        selected = np.flatnonzero(transforms == code)
        part = images[rows[selected]]
        view = part.transpose(0, 3, 2, 1) if code & 1 else part.transpose(0, 3, 1, 2)
        if code & 2:
            view = view[:, :, ::-1]
        if code & 4:
            view = view[:, :, :, ::-1]
        out[selected] = view
    return out


class MaskAssigner:
    """Gives every image of a batch an inpainting mask (uint8, 1 = missing), on the host.

    Training masks are random. Drawn through the datamodule's training loader, every item brings a
    draw key (a pure function of (seed, epoch, its position in the epoch's global order), see
    ``EpochSampler``) and its mask comes from a generator seeded by that key: the same whatever the
    rank, the worker or the number of processes, so N processes with batch b draw the masks of one
    process with batch N x b. Called without keys (a hand-built loader), one generator per batch is
    seeded from the torch global RNG. Evaluation masks are fixed per image: a generator seeded from
    (seed, cache row), so a test cell gets the same mask in every run, for every model, whatever the
    batch it lands in.

    Args:
        masks: Mask families, as ``MaskSampler.from_spec`` takes them (``"nucleus"``,
            ``"box,brush"``, ``{"box": 1, "brush": 2}``); names from ``celldiff.masks.mixture.FAMILIES``.
        options: Per-family keyword options, e.g. ``{"box": {"num_boxes": [1, 1]}}``.
        seed: Seed of the fixed evaluation masks.
        deterministic: Fixed per-image masks (evaluation) instead of random ones (training).

    Raises:
        DataError: an unknown family, a bad weight, an unknown option or an option value the
            family rejects (each family draws one trial mask here, so a typo fails at start-up).
    """

    def __init__(
        self,
        masks: MaskSpec,
        options: dict[str, dict[str, Any]] | None = None,
        seed: int = 0,
        deterministic: bool = False,
    ) -> None:
        what = f"data.masks {masks!r}" + (f" with data.mask_options {options!r}" if options else "")
        if (isinstance(masks, str) and not masks.strip(" ,")) or (not isinstance(masks, str) and not masks):
            raise DataError(
                f"data.masks {masks!r} names no mask type; expected one or more of {', '.join(MASK_TYPES)} "
                "(e.g. box,brush or {box: 1, nucleus: 2}), or null for no masks"
            )
        if options is not None and (
            not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values())
        ):
            raise DataError(
                f"data.mask_options {options!r}: expected options per mask type, e.g. {{box: {{num_boxes: [1, 1]}}}}"
            )
        try:
            self.sampler = MaskSampler.from_spec(masks, options=options)
            self.sampler.check()  # a trial mask per family: bad option values fail now, not mid-training
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise DataError(f"{what}: {err}") from None
        self.seed = seed
        self.deterministic = deterministic

    def __call__(self, images: torch.Tensor, rows: np.ndarray, keys: Sequence[int] | None = None) -> torch.Tensor:
        """Masks (B, 1, S, S) uint8 for uint8 images (B, 3, S, S) from cache rows ``rows`` (B,).

        ``keys`` (training only): one draw key per item; item i's mask then depends on ``keys[i]``
        and its image alone.
        """
        x = to_model_range(images)  # the nucleus mask reads the stain colours
        if self.deterministic:
            generators = [torch.Generator().manual_seed(mix_seed(self.seed, int(r))) for r in rows]
            masks = torch.stack([self.sampler(x[i], g) for i, g in enumerate(generators)])
        elif keys is not None:
            masks = self.sampler.per_item(x, [torch.Generator().manual_seed(mix_seed(int(k), _MASK_DRAW)) for k in keys])
        else:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            masks = self.sampler.batch(x, generator)
        return (masks > 0.5).to(torch.uint8)


class CellImageDataset(Dataset):
    """Cached cell images as ``{"image": uint8 (3, S, S), "label": long, "index": int}``.

    ``index`` is the cache row (``relpaths[index]`` names the file). With ``predict_seed`` the
    items also carry ``noise_seed`` for their position. ``get_batch`` fetches a whole batch with
    one memmap read; the datamodule's loaders use it. A memmap pickles as its file name, so
    spawned workers reopen it instead of receiving a copy.

    Args:
        images: (N, S, S, 3) uint8 array or memmap (the whole cache).
        labels: (N,) class index of each cache row.
        indices: Cache rows in this dataset (default all).
        augment: Random flips / 90° rotations: from each item's draw key when the loader passes keys
            (``EpochSampler``: independent of rank, worker and process count), else from the global
            torch RNG (seeded per worker).
        predict_seed: If set, items carry ``noise_seed = sample_seed(predict_seed, position)``.
        masker: If set, items carry an inpainting ``mask`` (uint8 (1, S, S), 1 = missing) drawn
            after augmentation.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        indices: Sequence[int] | np.ndarray | None = None,
        augment: bool = False,
        predict_seed: int | None = None,
        masker: MaskAssigner | None = None,
    ) -> None:
        self.images: np.ndarray | None = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(np.arange(len(images)) if indices is None else indices, dtype=np.int64)
        self.augment = augment
        self.predict_seed = predict_seed
        self.masker = masker
        self._shape = images.shape
        self._file = images.filename if isinstance(images, np.memmap) else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._file is not None:
            state["images"] = None  # reopened lazily in the worker
        return state

    def _array(self) -> np.ndarray:
        if self.images is None:
            images = np.load(self._file, mmap_mode="r")
            if images.shape != self._shape:
                raise RuntimeError(f"cache {self._file} changed shape since it was opened")
            self.images = images
        return self.images

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(
        self, positions: Sequence[int] | np.ndarray, keys: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Items at ``positions`` (B,) already collated.

        Returns ``image`` (B, 3, S, S) uint8, ``label`` (B,) int64, ``index`` (B,) int64 cache rows;
        with ``predict_seed`` also ``noise_seed`` (B,) int64, with a masker ``mask`` (B, 1, S, S)
        uint8 (1 = missing).

        ``keys``: one draw key per item (see ``draw_key``); item i's flip/rotation and training mask
        then depend on ``keys[i]`` alone, not on the batch, the process or the global RNG.
        """
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.indices[positions]
        if not self.augment:
            transforms = None
        elif keys is not None:
            transforms = np.array([mix_seed(int(k), _AUG_DRAW) % 8 for k in keys], dtype=np.int64)
        else:
            transforms = torch.randint(0, 8, (len(rows),)).numpy()
        columns = [self.labels[rows], rows]
        if self.predict_seed is not None:
            columns.append(np.array([sample_seed(self.predict_seed, int(p) % len(self)) for p in positions]))
        # One storage for the small columns: each storage costs a round trip from a worker process.
        meta = torch.from_numpy(np.stack(columns).astype(np.int64))
        batch = {"image": torch.from_numpy(_gather_chw(self._array(), rows, transforms)), "label": meta[0]}
        batch["index"] = meta[1]
        if self.predict_seed is not None:
            batch["noise_seed"] = meta[2]
        if self.masker is not None:
            batch["mask"] = self.masker(batch["image"], rows, keys=keys)
        return batch

    def with_masker(self, masker: MaskAssigner | None) -> CellImageDataset:
        """The same images (the memmap is shared, not copied), unaugmented, with other masks."""
        other = copy.copy(self)
        other.masker, other.augment = masker, False
        return other

    def __getitem__(self, position: int) -> dict[str, Any]:
        batch = self.get_batch([position])
        item: dict[str, Any] = {key: value[0] for key, value in batch.items()}
        item["index"] = int(item["index"])
        if "noise_seed" in item:
            item["noise_seed"] = int(item["noise_seed"])
        return item


class _Batched(Dataset):
    """Routes DataLoader batch fetches to ``get_batch`` (torch calls ``__getitems__``).

    Indices are dataset positions, or ``(position, draw key)`` pairs from ``EpochSampler``.
    """

    def __init__(self, dataset: CellImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(position, tuple):
            batch = self.dataset.get_batch([position[0]], keys=[position[1]])
            return {key: value[0] for key, value in batch.items()}
        return self.dataset[position]

    def __getitems__(self, positions: list[int] | list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        if positions and isinstance(positions[0], tuple):
            return self.dataset.get_batch([p for p, _ in positions], keys=[k for _, k in positions])
        return self.dataset.get_batch(positions)


class EpochSampler(DistributedSampler):
    """The training order of an epoch as one global sequence, cut into global batches and shared by the ranks.

    The global order of epoch e is a pure function of (``seed``, e): a permutation of the dataset,
    or, with ``weights``, as many draws with replacement (class balance). It is cut into global
    batches of ``num_replicas x batch_size``; rank r takes the r-th contiguous slice of each, the
    slice of the global batch that ``DiffusionModule`` gives rank r's noise. Every item comes with
    the draw key of its global position (``draw_key(seed, e, position)``), from which the dataset
    draws its flip/rotation and mask. So W processes with batch b see exactly the images,
    augmentations and masks of one process with batch W x b, whatever ``num_workers``.

    A ``DistributedSampler`` for Lightning (it leaves the sampler in place under DDP instead of
    wrapping it, and calls ``set_epoch`` every epoch, from the restored epoch on resume).

    Args:
        num_items: Length of the dataset.
        batch_size: Items per batch per rank.
        seed: Seed of the order and of the draws.
        num_replicas: Number of ranks.
        rank: This rank.
        weights: Per-item sampling weights (draws with replacement), or None for a permutation.
        drop_last: Only whole global batches (every rank gets ``batch_size`` items per step); else
            one process keeps the last partial batch and ranks wrap around to fill theirs.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        drop_last: bool = True,
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs torch.distributed and a dataset.
        if not 0 <= rank < num_replicas or batch_size < 1 or num_items < 1:
            raise ValueError(
                f"EpochSampler: num_items={num_items}, batch_size={batch_size}, rank {rank} of {num_replicas}"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, int(seed)
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        self.shuffle, self.epoch = True, 0
        global_batch = num_replicas * batch_size
        if drop_last:
            steps = num_items // global_batch
        else:
            steps = -(-num_items // global_batch)
        self.num_samples = steps * batch_size
        if not drop_last and num_replicas == 1:
            self.num_samples = num_items
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """Dataset positions of the whole epoch, in order (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(draw_key(self.seed, epoch, _ORDER_POSITION))
        if self.weights is None:
            return torch.randperm(self.num_items, generator=generator).numpy()
        return torch.multinomial(self.weights, self.num_items, replacement=True, generator=generator).numpy()

    def global_positions(self) -> np.ndarray:
        """Positions in the epoch's global order that this rank takes, in order."""
        b, w = self.batch_size, self.num_replicas
        if w == 1:
            return np.arange(self.num_samples)
        steps = self.num_samples // b
        return (np.arange(steps)[:, None] * (w * b) + self.rank * b + np.arange(b)[None, :]).ravel()

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        """(dataset position, draw key) of this rank's items of the epoch, in order."""
        order = self.global_order()
        for position in self.global_positions().tolist():
            yield int(order[position % self.num_items]), draw_key(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples


def collate_batch(items: Any) -> Any:
    """Pass batches built by ``get_batch`` through; collate lists of items as usual."""
    return items if isinstance(items, dict) else default_collate(items)


class NoiseDataset(Dataset):
    """Prediction items for sampling from noise: ``{"index", "noise_seed", "label"}``.

    Without ``classes``, labels cycle through the classes (``index % num_classes``). With
    ``classes``, there are ``num_samples`` items per class, class by class, and the j-th item of
    every class has the same noise seed: the same noise under each label.

    Args:
        num_samples: Number of items (per class when ``classes`` is given).
        num_classes: Number of classes of the data.
        predict_seed: Base of each item's ``noise_seed``.
        classes: Class ids to generate, in order.
    """

    def __init__(
        self, num_samples: int, num_classes: int, predict_seed: int = 0, classes: Sequence[int] | None = None
    ) -> None:
        self.num_samples, self.num_classes, self.predict_seed = (num_samples, num_classes, predict_seed)
        self.classes = list(classes) if classes else None

    def __len__(self) -> int:
        return self.num_samples * (len(self.classes) if self.classes else 1)

    def __getitem__(self, index: int) -> dict[str, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.classes:
            position, label = index % self.num_samples, self.classes[index // self.num_samples]
        else:
            position, label = index, index % max(1, self.num_classes)
        return {"index": index, "noise_seed": sample_seed(self.predict_seed, position), "label": label}


def interleaved_by_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Positions (N,) int64 into ``labels`` (N,) taking one item of each class in turn (a grid shows every class)."""
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    order = [p[r] for r in range(max(map(len, by_class), default=0)) for p in by_class if r < len(p)]
    return np.asarray(order, dtype=np.int64)


def resolve_classes(requested: str | Sequence[str | int], class_names: Sequence[str]) -> list[int]:
    """Class ids from names or ids (``"eosinophil,platelet"``, ``["3", "7"]``, ``"all"``).

    Raises:
        DataError: An unknown name or id, naming the valid ones.
    """
    items = (
        [p.strip() for p in requested.split(",")] if isinstance(requested, str) else [str(p).strip() for p in requested]
    )
    if items == ["all"]:
        return list(range(len(class_names)))
    ids = []
    valid = ", ".join(f"{i}={name}" for i, name in enumerate(class_names))
    for item in items:
        if item in class_names:
            ids.append(list(class_names).index(item))
        elif item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            raise DataError(f"unknown class {item!r}; valid classes are {valid} (or 'all')")
    return ids

