"""Scanning a PBC layout (folder, nested folder or zip), robust decoding, and the decode-once cache.

``scan_dataset`` (stat only) → ``load_cache`` / ``build_cache``: every usable image decoded once
into an (N, S, S, 3) uint8 ``.npy`` (memory-mapped afterwards) with a JSON of file names, labels,
sha256 and the skipped files. Pure functions; ``celldiff.data`` builds the splits, datasets and the
data module on top.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
CACHE_FORMAT_VERSION = 1  # bump whenever decoding changes, so old caches are not reused
_LAYOUT_HINT = (
    "expected one folder per cell class, e.g. basophil/ eosinophil/ …, or the Mendeley PBC_dataset_normal_DIB zip"
)


class DataError(ValueError):
    """Bad user input about the data, as one line: what was wrong, where, what was expected."""


class CellDataWarning(UserWarning):
    """A data problem that was worked around (skipped files, duplicates across classes)."""


class UnusableImageError(ValueError):
    """``load_image`` could not use a file; ``reason`` is a short phrase such as "not an image"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    # Covers .DS_Store, ._AppleDouble files, .ipynb_checkpoints and macOS zip junk.
    return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
    stem, dot, suffix = name.rpartition(".")
    return bool(stem) and not name.startswith(".") and dot + suffix.lower() in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Scan:
    """What ``scan_dataset`` found, without opening any image.

    ``relpaths`` are ``"<class>/<file>"`` relative to the folder holding the class folders, so a
    split file fits the folder and the zip of the same data alike.
    """

    source: Path  # resolved folder or .zip file
    prefix: str  # "" or "PBC_dataset_normal_DIB/": where the class folders sit inside source
    class_names: tuple[str, ...]
    relpaths: tuple[str, ...]
    labels: tuple[int, ...]
    stamps: tuple[str, ...]  # size:mtime (folder) or size:crc:date (zip member), for the cache key
    source_stamp: str = ""  # zip size:mtime; "" for folders
    empty_classes: tuple[str, ...] = ()

    @property
    def is_zip(self) -> bool:
        return self.source.is_file()

    def reader(self) -> contextlib.AbstractContextManager[Callable[[str], bytes]]:
        """``with scan.reader() as read: read(relpath) -> bytes`` (a zip is opened once)."""
        return _open_reader(str(self.source), self.prefix, self.is_zip)


@contextlib.contextmanager
def _open_reader(source: str, prefix: str, is_zip: bool) -> Iterator[Callable[[str], bytes]]:
    if is_zip:
        # One handle per chunk of work: ZipFile reads must not interleave across threads.
        with zipfile.ZipFile(source) as archive:
            yield lambda rel: archive.read(prefix + rel)
    else:
        base = os.path.join(source, prefix)

        def read(rel: str) -> bytes:
            with open(os.path.join(base, rel), "rb") as handle:
                return handle.read()

        yield read


def _list_folder(root: Path) -> tuple[dict[str, list[tuple[str, str]]], set[str], bool]:
    """Images (name, stamp) by parent folder for depth 1 and 2 below ``root`` + all folders."""
    images: dict[str, list[tuple[str, str]]] = {}
    folders: set[str] = set()

    def visit(rel: str, depth: int) -> None:
        with os.scandir(root / rel if rel else root) as entries:
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    folders.add(child)
                    if depth < 2:
                        visit(child, depth + 1)
                elif depth > 0 and _is_image_name(entry.name) and entry.is_file():
                    stat = entry.stat()
                    images.setdefault(rel, []).append((entry.name, f"{stat.st_size}:{stat.st_mtime_ns}"))

    visit("", 0)
    return images, folders, False


def _starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
    except OSError:
        return False


def _list_zip(path: Path) -> tuple[dict[str, list[tuple[str, str]]], set[str], bool]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile as error:
        raise DataError(f"data_dir {path} is a corrupt or truncated zip file ({error}); download it again") from None
    except OSError as error:
        raise DataError(f"cannot read zip file {path}: {error}; {_LAYOUT_HINT}") from None
    images: dict[str, list[tuple[str, str]]] = {}
    folders: set[str] = set()
    for info in infos:
        parts = info.filename.rstrip("/").split("/")
        if any(_is_hidden(part) for part in parts):
            continue
        dirs = parts if info.is_dir() else parts[:-1]
        folders.update("/".join(dirs[: i + 1]) for i in range(min(len(dirs), 2)))
        if not info.is_dir() and len(parts) in (2, 3) and _is_image_name(parts[-1]):
            stamp = f"{info.file_size}:{info.CRC}:{info.date_time}"
            images.setdefault("/".join(parts[:-1]), []).append((parts[-1], stamp))
    return images, folders, True


def scan_dataset(data_dir: str | os.PathLike[str], classes: Sequence[str] | None = None) -> Scan:
    """Find the class folders and image files of a PBC-style dataset (stats files, opens none).

    Args:
        data_dir: A folder holding one folder per class, such a folder nested one level deeper
            (``root/PBC_dataset_normal_DIB/<class>/``), or a ``.zip`` of either layout.
        classes: Optional subset of class names; labels are indices into the sorted subset.

    Raises:
        DataError: missing path, no class folders, ambiguous nesting or an unknown class.
    """
    path = Path(data_dir).expanduser()  # messages name the path as the user gave it
    if not path.exists():
        raise DataError(f"data_dir {path} does not exist (resolved to {path.absolute()}); {_LAYOUT_HINT}")
    resolved = path.resolve()  # the cache key must not depend on the working directory
    if resolved.is_dir():
        images, folders, is_zip = _list_folder(resolved)
    elif zipfile.is_zipfile(resolved):
        images, folders, is_zip = _list_zip(resolved)
    elif resolved.suffix.lower() == ".zip" or _starts_like_zip(resolved):
        try:  # not a zip by its end record: a truncated or damaged download
            zipfile.ZipFile(resolved).close()
            reason = "unreadable"
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            reason = str(error)
        raise DataError(
            f"data_dir {path} is a corrupt or truncated zip file ({reason}); download it again or unpack it and "
            "point data_dir at the folder"
        )
    else:
        raise DataError(f"data_dir {path} is neither a folder nor a .zip file; {_LAYOUT_HINT}")

    top = sorted(f for f in folders if "/" not in f)
    prefix = ""
    found = {f: images[f] for f in top if images.get(f)}
    if found:
        empty = [f for f in top if f not in found]
    else:
        # No images directly in top-level folders: look one level deeper (Mendeley's layout).
        holders = sorted({f.split("/")[0] for f in images if f.count("/") == 1})
        if len(holders) > 1:
            raise DataError(
                f"data_dir {path} holds class folders in several subfolders "
                f"({', '.join(holders)}); point data_dir at one of them"
            )
        if not holders:
            loose = is_zip is False and any(_is_image_name(e.name) for e in os.scandir(resolved) if e.is_file())
            hint = " (its images lie directly in it: point data_dir at the folder above it)" if loose else ""
            raise DataError(f"data_dir {path} holds no class folders with images{hint}; {_LAYOUT_HINT}")
        prefix = holders[0] + "/"
        inner = sorted(f for f in folders if f.startswith(prefix) and f.count("/") == 1)
        found = {f[len(prefix) :]: images[f] for f in inner if images.get(f)}
        empty = [f[len(prefix) :] for f in inner if not images.get(f)]

    names = sorted(found)
    if classes is not None:
        unknown = [c for c in classes if c not in found]
        if unknown or not classes:
            what = f"unknown class {unknown[0]!r}" if unknown else "empty class list"
            raise DataError(f"{what} in classes for {path}; valid: {', '.join(names)}")
        names = sorted(set(classes))
    entries = [
        (f"{name}/{file}", label, stamp) for label, name in enumerate(names) for file, stamp in sorted(found[name])
    ]
    stat = resolved.stat()
    return Scan(
        source=resolved,
        prefix=prefix,
        class_names=tuple(names),
        relpaths=tuple(e[0] for e in entries),
        labels=tuple(e[1] for e in entries),
        stamps=tuple(e[2] for e in entries),
        source_stamp=f"{stat.st_size}:{stat.st_mtime_ns}" if is_zip else "",
        empty_classes=tuple(empty),
    )


# ----------------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files instead of padding them grey; restore the caller's value."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if not previous:  # the usual case: touch nothing, so concurrent threads cannot race on it
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _wide_to_uint8(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float grey to 8 bit over its nominal range (not by clipping)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        values = values / 257.0  # 65535 → 255: the nominal 16-bit range
    elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    else:  # signed or out-of-range data has no nominal range: stretch what is there
        low, high = values.min(), values.max()
        values = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _wide_to_uint8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels become white, like the slide background, not black.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX


def load_image(source: bytes | str | os.PathLike[str] | BinaryIO, image_size: int) -> np.ndarray:
    """Decode one image to a centre-cropped, resized RGB array.

    JPEGs are decoded with DCT scaling (``draft``) to the smallest size still ≥ ``image_size``,
    which is several times faster than a full decode; the min-side square is then resized with
    antialiased bicubic. EXIF orientation is ignored: cells have no orientation.

    Args:
        source: Encoded bytes, a path, or a binary file object.
        image_size: Side S of the square output.

    Returns:
        uint8 array of shape (S, S, 3).

    Raises:
        UnusableImageError: empty, not an image, truncated or corrupt, with a short reason.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            source = Path(source).read_bytes()
        except OSError as error:
            raise UnusableImageError(f"unreadable ({error.strerror or error})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnusableImageError("empty file")
        source = io.BytesIO(source)
    with _strict_truncation():
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            raise UnusableImageError("not an image") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            truncated = "truncated" in str(error).lower()  # e.g. cut inside the header
            raise UnusableImageError("truncated image" if truncated else f"unreadable image ({error})") from None
        with image:
            kind = image.format or "image"
            width, height = float(image.size[0]), float(image.size[1])
            try:
                if kind == "JPEG" and min(width, height) > image_size:
                    drafted = image.draft("RGB", (image_size, image_size))
                    if drafted is not None:  # the part of the reduced image that holds data
                        width, height = drafted[1][2], drafted[1][3]
                image.load()
                rgb = _to_rgb(image)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                if "truncated" in str(error).lower() or "broken data stream" in str(error):
                    raise UnusableImageError(f"truncated {kind}") from None
                raise UnusableImageError(f"corrupt {kind} ({error})") from None
            if width < 1 or height < 1:
                raise UnusableImageError("empty image (0 pixels)")
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            if (width, height) == rgb.size:  # not drafted: whole-pixel offsets keep a same-size crop exact
                left, top = float(int(left)), float(int(top))
            box = (left, top, left + side, top + side)
            if box != (0, 0, image_size, image_size) or rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            return np.array(rgb, dtype=np.uint8)


# -------------------------------------------------------------------------------------- cache


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
    with _open_reader(*source) as read, _strict_truncation():
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
                results.append((digest, error.reason))
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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
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
        with open(tmp, "wb") as out, _strict_truncation():  # set once: threads never race on it
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
        _write_json(json_path, metadata)
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
