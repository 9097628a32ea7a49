"""The train/val/test split: seeded by content hash, stratified by class, byte-identical files kept together.

``make_split`` places each file by a hash of (seed, its bytes), so adding, removing or renaming other
files moves nothing; ``save_split`` / ``load_split`` keep it as a run's ``split.json``;
``split_indices`` maps it onto the cache rows.
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

import numpy as np

from celldiff.data.imagecache import write_json
from celldiff.errors import CellDataWarning, DataError

SPLIT_NAMES = ("train", "val", "test")


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
    write_json(path, split.to_dict())


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


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Train/val/test fractions as floats; DataError unless three, finite, >= 0, summing to 1, train > 0."""
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
    fractions = check_fractions(fractions)
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
