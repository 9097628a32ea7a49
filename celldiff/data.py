"""Blood-cell images in, uint8 batches out.

Flow: ``scan_dataset`` (stat only) → ``load_cache`` / ``build_cache`` (in ``celldiff.imagecache``: (every usable image decoded
once into an (N, S, S, 3) uint8 ``.npy``, memory-mapped afterwards) → here: ``make_split`` /
``load_split`` (seeded, stratified, byte-identical files kept together) → ``CellImageDataset``
(memmap slices + dihedral augmentation) → ``EpochSampler`` (the training order and every item's
random draws from (seed, epoch, global position), shared out across DDP ranks) → ``CellDataModule``.

The pure functions need no Lightning; notebooks and benchmarks use them directly.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from celldiff.imagecache import (
    CACHE_FORMAT_VERSION,
    IMAGE_SUFFIXES,
    CachedData,
    CellDataWarning,
    DataError,
    Scan,
    UnusableImageError,
    _write_json,
    build_cache,
    cache_key,
    cache_paths,
    default_cache_dir,
    load_cache,
    load_image,
    scan_dataset,
)

# Re-exported: the scanning and cache API is part of celldiff.data's public interface.
__all__ = [
    "CACHE_FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "CachedData",
    "CellDataWarning",
    "DataError",
    "Scan",
    "UnusableImageError",
    "build_cache",
    "cache_key",
    "cache_paths",
    "default_cache_dir",
    "load_cache",
    "load_image",
    "scan_dataset",
    "CellDataModule",
    "CellImageDataset",
    "EpochSampler",
    "draw_key",
    "MaskAssigner",
    "NoiseDataset",
    "Split",
    "SPLIT_NAMES",
    "PREDICT_SOURCES",
    "load_split",
    "make_split",
    "mix_seed",
    "noise_seed_for",
    "resolve_classes",
    "save_split",
    "split_indices",
    "tensor_to_uint8",
]

SPLIT_NAMES = ("train", "val", "test")
MAX_IMAGE_SIZE = 4096
PREDICT_SOURCES = ("noise", *SPLIT_NAMES)

# -------------------------------------------------------------------------------------- split


@dataclasses.dataclass
class Split:
    """Relative paths (``"<class>/<file>"``) per split, and how they were drawn."""

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int | None = None
    fractions: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "method": "content-hash",  # v2: each file placed by a hash of (seed, its bytes); v1 (shuffled ranks) loads too
            "seed": self.seed,
            "fractions": list(self.fractions) if self.fractions else None,
            "train": self.train,
            "val": self.val,
            "test": self.test,
        }


def save_split(split: Split, path: str | os.PathLike[str]) -> None:
    """Write ``split`` as JSON (atomically) so a later run can reuse it via ``split_file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, split.to_dict())


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read a split written by ``save_split``.

    Raises:
        DataError: the file is missing or is not a celldiff split.
    """
    try:
        payload = json.loads(Path(path).read_text())
        lists = [[str(p) for p in payload[name]] for name in SPLIT_NAMES]
        fractions = payload.get("fractions")
        return Split(*lists, seed=payload.get("seed"), fractions=tuple(fractions) if fractions else None)
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(
            f"split file {path} is not a celldiff split ({error}); expected JSON "
            'with "train", "val" and "test" lists of paths'
        ) from None


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if (
        len(values) != 3
        or not all(math.isfinite(v) and v >= 0 for v in values)
        or abs(sum(values) - 1) > 1e-6
        or values[0] == 0
    ):
        raise DataError(
            f"split_fractions {list(fractions)} are invalid; expected three "
            "non-negative fractions for train/val/test summing to 1, train > 0"
        )
    return values  # type: ignore[return-value]


def _split_position(seed: int, digest: str) -> float:
    """Where a file falls in [0, 1) for the split: a hash of (seed, its content digest).

    A pure function of the file's bytes, so adding, removing or renaming other files never moves it.
    """
    raw = hashlib.sha256(f"celldiff-split:{seed}:{digest}".encode()).digest()
    return int.from_bytes(raw[:8], "big") / 2.0**64


def make_split(
    relpaths: Sequence[str],
    labels: Sequence[int],
    sha256: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Split:
    """Seeded split by content hash, stratified by class, that never puts byte-identical files in two splits.

    Each file (each group of byte-identical files) gets a position ``u`` in [0, 1) from a hash of
    (``seed``, its SHA-256), and goes to train if ``u < f_train``, val if ``u < f_train + f_val``,
    else test. The assignment of a file depends on its bytes alone: adding, removing, renaming or
    relabelling other files moves nothing else (a changed file moves at most itself), and the split
    of one class does not depend on the others. Every class is split with the same fractions, so
    each holds ``fraction × images`` in expectation (binomial spread: for 1,000 images at 0.2,
    ± 13 images is one standard deviation). A class that would get no training image at all (a
    class of 1-3 images) trains on its lowest-``u`` file, so even a one-image class trains.
    Groups whose copies carry different labels are warned about and follow the first copy.

    Args:
        relpaths: Path of each image, ``"<class>/<file>"``.
        labels: Class index of each image.
        sha256: Digest of each file's bytes (an empty digest falls back to the path).
        fractions: Train/val/test fractions, summing to 1.
        seed: Seed of the hash; another seed gives an independent split.
        class_names: Unused (the split of a class is independent of the others); kept for callers.
    """
    fractions = _check_fractions(fractions)
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(sha256):
        groups.setdefault(digest or f"path:{relpaths[index]}", []).append(index)
    mixed = [g for g in groups.values() if len({labels[i] for i in g}) > 1]
    if mixed:
        shown = "; ".join(" = ".join(relpaths[i] for i in g) for g in mixed[:5])
        warnings.warn(
            f"celldiff: {len(mixed)} set{'s' * (len(mixed) != 1)} of byte-identical "
            f"files carry different labels (kept in one split): {shown}",
            CellDataWarning,
            stacklevel=2,
        )
    train_end, val_end = fractions[0], fractions[0] + fractions[1]
    chosen: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    by_class: dict[int, list[tuple[float, list[int]]]] = {}
    for key, group in groups.items():
        by_class.setdefault(int(labels[group[0]]), []).append((_split_position(seed, key), group))
    for _, class_groups in sorted(by_class.items()):
        names = ["train" if u < train_end else "val" if u < val_end else "test" for u, _ in class_groups]
        if "train" not in names:  # a tiny class: its lowest-u file trains
            names[min(range(len(class_groups)), key=lambda j: class_groups[j][0])] = "train"
        for name, (_, group) in zip(names, class_groups, strict=True):
            chosen[name].extend(group)
    lists = [[relpaths[i] for i in sorted(chosen[name])] for name in SPLIT_NAMES]
    return Split(*lists, seed=seed, fractions=fractions)


def split_indices(
    split: Split, relpaths: Sequence[str], where: str = "split"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cache rows of the train/val/test paths of ``split``.

    Raises:
        DataError: a path of the split is not in the data, or is in two splits.
    """
    rows = {path: row for row, path in enumerate(relpaths)}
    listed = [p for name in SPLIT_NAMES for p in getattr(split, name)]
    missing = [p for p in listed if p not in rows]
    if missing:
        raise DataError(
            f"{where} lists {len(missing)} file(s) not among the {len(rows)} usable "
            f"images of the data, first: {missing[0]}; expected paths like "
            f"{relpaths[0] if relpaths else '<class>/<file>'} (a saved split is never recomputed silently: restore the"
            " files, or pass --data.split_file of another split)"
        )
    if len(set(listed)) != len(listed):
        twice = next(p for p, n in collections.Counter(listed).items() if n > 1)
        raise DataError(f"{where} lists {twice} more than once; expected disjoint splits")
    if len(listed) < len(rows):
        warnings.warn(
            f"celldiff: {len(rows) - len(listed)} images are in no split of {where} and are not used",
            CellDataWarning,
            stacklevel=2,
        )
    return tuple(  # type: ignore[return-value]
        np.array([rows[p] for p in getattr(split, name)], dtype=np.int64) for name in SPLIT_NAMES
    )


# ------------------------------------------------------------------------------------ datasets


def noise_seed_for(predict_seed: int, index: int) -> int:
    """Seed of prediction sample ``index``: fixed whatever the batch size or device count."""
    return (predict_seed * 1_000_003 + index) % 2**63


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
        masks: Mask types, as ``MaskSampler.from_spec`` takes them (``"nucleus"``,
            ``"box,brush"``, ``{"box": 1, "brush": 2}``).
        options: Per-type keyword options, e.g. ``{"box": {"num_boxes": [1, 1]}}``.
        seed: Seed of the fixed evaluation masks.
        deterministic: Fixed per-image masks (evaluation) instead of random ones (training).

    Raises:
        DataError: an unknown mask type, a bad weight, an unknown option or an option value the
            mask generator rejects (each type draws one trial mask here, so a typo fails at start-up).
    """

    def __init__(
        self, masks: Any, options: dict[str, dict[str, Any]] | None = None, seed: int = 0, deterministic: bool = False
    ) -> None:
        from celldiff.masks import MASK_TYPES, MaskSampler

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
            probe = torch.zeros(3, 32, 32)  # a trial mask per type: bad option values fail now, not mid-training
            for name in self.sampler.names:
                self.sampler.make(name, probe, torch.Generator().manual_seed(0))
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise DataError(f"{what}: {err}") from None
        self.seed = seed
        self.deterministic = deterministic

    def __call__(self, images: torch.Tensor, rows: np.ndarray, keys: Sequence[int] | None = None) -> torch.Tensor:
        """Masks (B, 1, S, S) uint8 for uint8 images (B, 3, S, S) from cache rows ``rows``.

        ``keys`` (training only): one draw key per item; item i's mask then depends on ``keys[i]``
        and its image alone.
        """
        x = images.float().div_(127.5).sub_(1.0)  # the nucleus mask reads the stain colours
        if self.deterministic:
            masks = torch.stack(
                [
                    self.sampler(x[i], torch.Generator().manual_seed(mix_seed(self.seed, int(r))))
                    for i, r in enumerate(rows)
                ]
            )
        elif keys is not None:
            masks = self._per_item(x, [torch.Generator().manual_seed(mix_seed(int(k), _MASK_DRAW)) for k in keys])
        else:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            masks = self.sampler.batch(x, generator)
        return (masks > 0.5).to(torch.uint8)

    def _per_item(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Item i's mask exactly as ``sampler(x[i], generators[i])``; nucleus masks in one batched pass."""
        from celldiff.masks import nucleus_mask

        sampler = self.sampler
        names = sampler.last_types = [sampler.choose(g) for g in generators]
        masks = torch.empty(x.shape[0], 1, *x.shape[-2:])
        nucleus_rows = [i for i, name in enumerate(names) if name == "nucleus"]
        if nucleus_rows:
            found_masks, found = nucleus_mask(
                x[nucleus_rows], None, **sampler.options.get("nucleus", {}), return_found=True
            )
            masks[nucleus_rows] = found_masks
            for j, i in enumerate(nucleus_rows):
                if not bool(found[j]):  # the fallback square draws from the item's own generator
                    masks[i] = sampler.make("nucleus", x[i], generators[i])
        for i, name in enumerate(names):
            if name != "nucleus":
                masks[i] = sampler.make(name, x[i], generators[i])
        return masks


_AUG_DRAW, _MASK_DRAW = 0xA6, 0x3A  # separate streams derived from one item's key
_ORDER_POSITION = -1  # the epoch order's generator: draw_key of a position no item has


def draw_key(seed: int, epoch: int, position: int) -> int:
    """The key of all random draws (flip/rotation, mask) of the item at ``position`` of an epoch's global order."""
    return mix_seed(seed, epoch, position)


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


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
        predict_seed: If set, items carry ``noise_seed = noise_seed_for(predict_seed, position)``.
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
        """Items at ``positions`` already collated: image (B, 3, S, S) uint8, label, index.

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
            columns.append(np.array([noise_seed_for(self.predict_seed, int(p) % len(self)) for p in positions]))
        # One storage for the small columns: each storage costs a round trip from a worker process.
        meta = torch.from_numpy(np.stack(columns).astype(np.int64))
        batch = {"image": torch.from_numpy(_gather_chw(self._array(), rows, transforms)), "label": meta[0]}
        batch["index"] = meta[1]
        if self.predict_seed is not None:
            batch["noise_seed"] = meta[2]
        if self.masker is not None:
            batch["mask"] = self.masker(batch["image"], rows, keys=keys)
        return batch

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

    def __iter__(self):  # type: ignore[override]
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
        return {"index": index, "noise_seed": noise_seed_for(self.predict_seed, position), "label": label}


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


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] (any shape) to uint8 [0, 255], rounding and clamping."""
    return ((x.detach().float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------- datamodule


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_data_dir(data_dir: str) -> str:
    """A relative data_dir missing from the working directory is looked up in the repository.

    So the bundled default, ``data/pbc_sample``, works from any directory in a source checkout.
    """
    path = Path(data_dir).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return str(path)


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
            (-1: the whole split).
        predict_seed: Base of each predict item's ``noise_seed``.
        predict_batch_size: Batch size for predict; default ``batch_size``.
        masks: Inpainting masks with every image (Phase 2): a type (``box``, ``brush``,
            ``centre``, ``half``, ``outpaint``, ``nucleus``), a comma-separated list, or a dict of
            weights (``{box: 1, brush: 2}``); ``null`` = no masks. Random for training, fixed
            per image (seeded by ``mask_seed``) for val/test/predict.
        eval_masks: Mask types of val/test/predict if they differ from ``masks`` (e.g. train on a
            mixture, evaluate on ``nucleus``).
        mask_options: Keyword options per mask type, e.g. ``{box: {num_boxes: [1, 1]}}``.
        mask_seed: Seed of the fixed evaluation masks.
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
        self.split_fractions = _check_fractions(split_fractions)
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
        # Lightning runs this on one process per node, so under DDP only one process decodes (and
        # re-hashes the files to check the cache: a file rewritten with the same size and mtime).
        scan = self._get_scan(fresh=True)
        self._scanned_in_prepare = True  # setup in this process reuses the scan
        if getattr(self.trainer, "predicting", False) and not self._predict_needs_cache():
            return
        cached = None
        if all(p.exists() for p in cache_paths(scan, self.image_size, self.cache_dir)):
            cached = load_cache(scan, self.image_size, self.cache_dir)
        if cached is None:
            cached = build_cache(scan, self.image_size, self.cache_dir)
            self._log_cache(cached, reused=False)
        else:
            self._log_cache(cached, reused=True)
        self._prepared = cached  # checked (and its warning shown): setup in this process takes it as is

    def _log_cache(self, cached: CachedData, reused: bool) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        if reused:
            how = (
                "zip member sizes, CRCs and dates"
                if cached.source_is_zip
                else f"file names, sizes and mtimes; {cached.verified:,} of {cached.num_files:,} files re-hashed"
            )
            rank_zero_info(
                f"celldiff: reusing the image cache {cached.path} ({len(cached.relpaths):,} images; key {cached.key}"
                f" matched by {how})"
            )
        else:
            rank_zero_info(f"celldiff: decoded {len(cached.relpaths):,} images into the cache {cached.path}")

    def _predict_needs_cache(self) -> bool:
        return self.predict_images is None and self.predict_source != "noise"

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and not self._predict_needs_cache():
            return  # generating, or inpainting the user's files: the dataset is not needed
        if self.cached is None and self._prepared is not None:
            self.cached = self._prepared
        if self.cached is None:
            scan = self._get_scan(fresh=not self._scanned_in_prepare)
            self.cached = load_cache(scan, self.image_size, self.cache_dir)
            if self.cached is None:  # prepare_data was skipped, the cache was deleted, or a file changed
                self.cached = build_cache(scan, self.image_size, self.cache_dir)
                self._log_cache(self.cached, reused=False)
            else:
                self._log_cache(self.cached, reused=True)
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
        if self.predict_images is not None:
            from celldiff.user_images import UserImageDataset

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
            labels = self.cached.labels[source.indices]
            # Interleave classes so the first items (a sample grid) show every class.
            by_class = [np.flatnonzero(labels == c) for c in range(len(self.cached.class_names))]
            order = [p[r] for r in range(max(map(len, by_class), default=0)) for p in by_class if r < len(p)]
            if self.num_predict_samples >= 0:
                order = order[: self.num_predict_samples]
            dataset = CellImageDataset(
                self.cached.images,
                self.cached.labels,
                source.indices[np.asarray(order, dtype=np.int64)],
                predict_seed=self.predict_seed,
                masker=self.eval_masker,
            )
        return self._loader(dataset, self.predict_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The host ships uint8 (4× less traffic than float32); scaling happens on the device.
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
            if batch["image"].dtype == torch.uint8:
                batch = {**batch, "image": batch["image"].float().div_(127.5).sub_(1.0)}  # leave the input intact
            if isinstance(batch.get("mask"), torch.Tensor) and batch["mask"].dtype == torch.uint8:
                batch = {**batch, "mask": batch["mask"].float()}
            trainer = self.trainer
            if "mask" in batch and self.predict_classes is not None and trainer is not None and trainer.predicting:
                # Inpaint every image as each requested class (a counterfactual panel per cell).
                ids = torch.tensor(self.predict_class_ids, device=batch["image"].device)
                batch = {**batch, "target_classes": ids}
        return batch
