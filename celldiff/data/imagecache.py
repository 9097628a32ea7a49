"""The decode-once cache: every usable image of a scan decoded once into an (N, S, S, 3) uint8 ``.npy``.

``build_cache`` decodes (in a pool of threads or processes) and writes the ``.npy`` with a JSON of
file names, labels, sha256 and the skipped files; ``load_cache`` memory-maps it afterwards, after
checking the key (names, sizes, mtimes) and re-hashing the files' bytes. Pure functions, no torch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import struct
import sys
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from celldiff.data.decode import load_image, strict_truncation
from celldiff.data.scan import Scan, open_reader
from celldiff.errors import CellDataWarning, DataError, UnusableImageError

CACHE_FORMAT_VERSION = 1  # bump whenever decoding changes, so old caches are not reused


@dataclasses.dataclass
class CachedData:
    """The decoded dataset: ``images[i]`` is ``relpaths[i]`` with label ``labels[i]``."""

    images: np.ndarray  # (N, S, S, 3) uint8, a read-only memmap when loaded from disk
    labels: np.ndarray  # (N,) int64
    relpaths: list[str]
    sha256: list[str]
    class_names: list[str]
    skipped: list[tuple[str, str]]  # (relpath, reason) of unusable files
    image_size: int
    path: Path | None = None  # the .npy file
    key: str = ""  # the cache key it was found or built under
    source_is_zip: bool = False
    num_files: int = 0  # image files of the scan (usable + skipped)
    verified: int = 0  # files whose content was re-hashed against the cache when it was loaded

    def summary(self, reused: bool) -> str:
        """One log line: which cache was decoded, or reused and how its key was matched."""
        if not reused:
            return f"celldiff: decoded {len(self.relpaths):,} images into the cache {self.path}"
        how = (
            "zip member sizes, CRCs and dates"
            if self.source_is_zip
            else f"file names, sizes and mtimes; {self.verified:,} of {self.num_files:,} files re-hashed"
        )
        return (
            f"celldiff: reusing the image cache {self.path} ({len(self.relpaths):,} images; key {self.key}"
            f" matched by {how})"
        )


def default_cache_dir() -> Path:
    """``$CELLDIFF_CACHE_DIR`` if set, else ``~/.cache/celldiff``."""
    return Path(os.environ.get("CELLDIFF_CACHE_DIR") or Path.home() / ".cache" / "celldiff")


def cache_key(scan: Scan, image_size: int) -> str:
    """Hash of everything the cached pixels depend on; any touched file gives a new key."""
    payload = [
        CACHE_FORMAT_VERSION,
        str(scan.source),
        scan.source_stamp,
        scan.prefix,
        scan.class_names,
        image_size,
        scan.relpaths,
        scan.stamps,
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def cache_paths(scan: Scan, image_size: int, cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """(images .npy, metadata .json) for this scan; the JSON is written last and marks completion."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem = f"{scan.source.stem}-{image_size}px-{cache_key(scan, image_size)}"
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def _warn_skipped(
    source: Path, skipped: Sequence[tuple[str, str]], empty: Sequence[str], metadata: Path | None
) -> None:
    parts = []
    if skipped:
        shown = ", ".join(f"{rel} ({reason})" for rel, reason in skipped[:5])
        more = ", …" if len(skipped) > 5 else ""
        where = f" (full list in {metadata})" if metadata and len(skipped) > 5 else ""
        parts.append(
            f"skipped {len(skipped)} unusable file{'s' * (len(skipped) != 1)} in {source}: {shown}{more}{where}"
        )
    if empty:
        parts.append(
            f"ignored {len(empty)} class folder{'s' * (len(empty) != 1)} without "
            f"images: {', '.join(e + '/' for e in empty)}"
        )
    if parts:
        warnings.warn("celldiff: " + "; ".join(parts), CellDataWarning, stacklevel=3)


def _decode_chunk(
    source: tuple[str, str, bool], relpaths: list[str], image_size: int
) -> tuple[np.ndarray, list[tuple[str, str | None]]]:
    """Decode ``relpaths``: (pixels of the usable ones, (sha256, reason or None) per file)."""
    pixels = np.empty((len(relpaths), image_size, image_size, 3), dtype=np.uint8)
    results: list[tuple[str, str | None]] = []
    usable = 0
    with open_reader(*source) as read, strict_truncation():
        for rel in relpaths:
            try:
                data = read(rel)
            except (OSError, zipfile.BadZipFile, zlib.error) as error:
                results.append(("", f"unreadable ({error})"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            try:
                pixels[usable] = load_image(data, image_size)
                usable += 1
                results.append((digest, None))
            except UnusableImageError as error:
                results.append((digest, str(error)))
    return pixels[:usable], results


def _make_pool(workers: int, mean_file_bytes: float) -> Executor:
    # Small files (e.g. 64 px JPEGs): PIL's Python-side parsing dominates and holds the GIL, so
    # processes scale (fork: start-up near free). Large files: the C decoder dominates and drops
    # the GIL, so threads scale without shipping pixels between processes.
    if mean_file_bytes < 8192 and sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(workers)


def _npy_header(shape: tuple[int, ...], length: int = 128) -> bytes:
    """A fixed-length .npy v1.0 header, so pixels can be streamed before the final count is known."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": shape})
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + text.ljust(length - 11).encode() + b"\n"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON under a temporary name, then move it into place (never a half file)."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def build_cache(
    scan: Scan, image_size: int, cache_dir: str | os.PathLike[str] | None = None, workers: int | None = None
) -> CachedData:
    """Decode every usable image of ``scan`` once into ``<cache_dir>/<name>-<S>px-<key>.npy``.

    Unusable files are skipped and named in one ``CellDataWarning``. Both files are written under
    temp names and moved into place, the metadata JSON last, so a crash never leaves a broken cache.

    Args:
        scan: Result of ``scan_dataset``.
        image_size: Side S of the cached square images.
        cache_dir: Folder for the cache; default ``default_cache_dir()``.
        workers: Decode threads or processes; default the CPUs this process may use.

    Raises:
        DataError: no usable image at all, the cache folder is not a writable folder, or its disk
            has no room for the cache.
    """
    npy_path, json_path = cache_paths(scan, image_size, cache_dir)
    count = len(scan.relpaths)
    _check_cache_folder(npy_path.parent, count * 3 * image_size**2)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers, count // 64))  # a pool costs ~0.1 s: not worth it for a handful
    # Chunks of ≤ 64 MiB of pixels, about 8 per worker: few zip reopenings, bounded memory.
    chunk = max(1, min(max(16, math.ceil(count / (workers * 8))), 2**26 // (3 * image_size**2)))
    source = (str(scan.source), scan.prefix, scan.is_zip)
    tasks = [(source, list(scan.relpaths[i : i + chunk]), image_size) for i in range(0, count, chunk)]
    results: list[tuple[str, str | None]] = []
    tmp = npy_path.with_name(f"{npy_path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as out, strict_truncation():  # set once: threads never race on it
            out.write(_npy_header((0,)))  # placeholder until the usable count is known

            def write(chunk_result: tuple[np.ndarray, list[tuple[str, str | None]]]) -> None:
                out.write(memoryview(np.ascontiguousarray(chunk_result[0])))
                results.extend(chunk_result[1])

            if workers == 1:
                for task in tasks:
                    write(_decode_chunk(*task))
            else:
                mean_bytes = sum(int(stamp.split(":")[0]) for stamp in scan.stamps) / count
                with _make_pool(workers, mean_bytes) as pool, warnings.catch_warnings():
                    # Python ≥ 3.12 warns about fork() in a threaded process; the workers only
                    # decode with PIL/numpy and never touch torch's thread pools.
                    warnings.filterwarnings("ignore", ".*fork", DeprecationWarning)
                    pending: collections.deque[Future] = collections.deque()
                    for task in tasks:  # in order, a few chunks in flight: sequential writes
                        pending.append(pool.submit(_decode_chunk, *task))
                        if len(pending) > 2 * workers:
                            write(pending.popleft().result())
                    while pending:
                        write(pending.popleft().result())
            usable = [row for row, (_, reason) in enumerate(results) if reason is None]
            skipped = [(scan.relpaths[row], reason) for row, (_, reason) in enumerate(results) if reason]
            if not usable:
                shown = ", ".join(f"{rel} ({reason})" for rel, reason in skipped[:3])
                raise DataError(f"no usable image in {scan.source}: all {count} image files are unusable, e.g. {shown}")
            out.seek(0)
            out.write(_npy_header((len(usable), image_size, image_size, 3)))
        os.replace(tmp, npy_path)
        metadata = {
            "format_version": CACHE_FORMAT_VERSION,
            "key": cache_key(scan, image_size),
            "source": str(scan.source),
            "prefix": scan.prefix,
            "image_size": image_size,
            "class_names": list(scan.class_names),
            "relpaths": [scan.relpaths[row] for row in usable],
            "labels": [scan.labels[row] for row in usable],
            "sha256": [results[row][0] for row in usable],
            "skipped": skipped,
            "skipped_sha256": [results[row][0] for row, (_, reason) in enumerate(results) if reason],
            "empty_classes": list(scan.empty_classes),
        }
        write_json(json_path, metadata)
    except OSError as error:
        raise DataError(
            f"cannot write the image cache in {npy_path.parent}: {error}; "
            "set cache_dir or CELLDIFF_CACHE_DIR to a writable folder"
        ) from None
    finally:
        with contextlib.suppress(OSError):  # never hide the error above behind one of the cleanup
            tmp.unlink(missing_ok=True)
    _warn_skipped(scan.source, skipped, scan.empty_classes, json_path)
    return _open_cache(npy_path, metadata, scan, verified=len(scan.relpaths))


def _check_cache_folder(folder: Path, needed_bytes: int) -> None:
    """The cache folder exists (created if need be), is a writable folder, and has room for the cache."""
    hint = "set --data.cache_dir or CELLDIFF_CACHE_DIR to a writable folder"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = (
            f"cache folder {folder} is a file"
            if existing == folder
            else f"cache folder {folder} is inside a file, {existing}"
        )
        raise DataError(f"{what}, not a folder; {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache folder {folder}: {error.strerror or error}; {hint}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"cache folder {folder} is not writable; {hint}")
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        if needed_bytes > free:
            raise DataError(
                f"the image cache needs {needed_bytes / 2**30:.2f} GiB in {folder} but its disk has "
                f"{free / 2**30:.2f} GiB free; free some space, {hint} on another disk, or lower image_size"
            )


def _open_cache(npy_path: Path, metadata: dict[str, Any], scan: Scan, verified: int = 0) -> CachedData:
    return CachedData(
        images=np.load(npy_path, mmap_mode="r"),
        labels=np.asarray(metadata["labels"], dtype=np.int64),
        relpaths=list(metadata["relpaths"]),
        sha256=list(metadata["sha256"]),
        class_names=list(metadata["class_names"]),
        skipped=[(rel, reason) for rel, reason in metadata["skipped"]],
        image_size=int(metadata["image_size"]),
        path=npy_path,
        key=str(metadata.get("key", "")),
        source_is_zip=scan.is_zip,
        num_files=len(scan.relpaths),
        verified=verified,
    )


# Re-hash at most this many bytes of the source files when a cache is loaded: all of pbc64
# (17,092 files, 46 MB: 0.35 s on one core), a random sample of larger data sets.
VERIFY_BYTES = 128 * 2**20


def _changed_files(scan: Scan, metadata: dict[str, Any], budget: int | None = None) -> tuple[list[str], int]:
    """Files of a folder whose bytes no longer match the digest recorded at build, and how many were checked.

    The cache key holds each file's size and mtime; a file rewritten with the same size and mtime
    (a restored backup, ``cp -p``, ``rsync -t``) is only caught by its content.
    """
    digests = dict(zip(metadata["relpaths"], metadata["sha256"], strict=True))
    skipped = [rel for rel, _ in metadata.get("skipped", [])]
    digests.update((rel, d) for rel, d in zip(skipped, metadata.get("skipped_sha256", []), strict=False) if d)
    sizes = dict(zip(scan.relpaths, (int(stamp.split(":")[0]) for stamp in scan.stamps), strict=True))
    names = [rel for rel in scan.relpaths if rel in digests]
    budget = VERIFY_BYTES if budget is None else budget
    if sum(sizes[rel] for rel in names) > budget:  # a random sample, a different one every time
        order = np.random.default_rng().permutation(len(names))
        chosen, total = [], 0
        for i in order.tolist():
            if total >= budget:
                break
            chosen.append(names[i])
            total += sizes[names[i]]
        names = chosen
    changed = []
    with scan.reader() as read:
        for rel in names:
            try:
                data = read(rel)
            except OSError:
                changed.append(rel)
                continue
            if hashlib.sha256(data).hexdigest() != digests[rel]:
                changed.append(rel)
    return changed, len(names)


def load_cache(
    scan: Scan,
    image_size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    warn: bool = True,
    verify: bool = True,
) -> CachedData | None:
    """Memory-map the cache of ``scan`` if a complete, current one exists.

    The cache is found by a key of the files' names, sizes and mtimes (zip: sizes, CRCs, dates).
    For a folder, ``verify`` also re-hashes the files (all of them up to ``VERIFY_BYTES``, else a
    random sample of that size) against the digests recorded at build: a file rewritten with the
    same size and mtime is caught, warned about by name, and the cache is rebuilt (None).

    Args:
        scan: Result of ``scan_dataset``; its file stamps select the cache.
        image_size: Side S of the cached images.
        cache_dir: Folder of the cache; default ``default_cache_dir()``.
        warn: Repeat the one-line summary of skipped files.
        verify: Re-hash the files of a folder source (decodes nothing).

    Returns:
        The cached data, or None when there is no complete, current cache for this key.
    """
    npy_path, json_path = cache_paths(scan, image_size, cache_dir)
    try:
        metadata = json.loads(json_path.read_text())
        data = _open_cache(npy_path, metadata, scan)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: the caller rebuilds
    expected = (len(data.relpaths), image_size, image_size, 3)
    if (
        metadata.get("key") != cache_key(scan, image_size)
        or data.images.shape != expected
        or data.images.dtype != np.uint8
    ):
        return None
    if verify and not scan.is_zip:  # a zip's key holds every member's CRC already
        try:
            changed, data.verified = _changed_files(scan, metadata)
        except (KeyError, ValueError, TypeError):
            return None  # metadata of an unexpected shape: rebuild
        if changed:
            shown = ", ".join(changed[:5]) + (", …" if len(changed) > 5 else "")
            warnings.warn(
                f"celldiff: {len(changed)} file{'s' * (len(changed) != 1)} of {scan.source} changed since the cache "
                f"{json_path} was built although their sizes and modification times did not ({shown}); rebuilding it",
                CellDataWarning,
                stacklevel=2,
            )
            return None
    if warn:
        _warn_skipped(scan.source, data.skipped, metadata.get("empty_classes", []), json_path)
    return data
