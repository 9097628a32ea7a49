"""Scanning a PBC layout (folder, nested folder or zip): class folders and image files, stat only.

``scan_dataset`` opens no image: it lists the files of each class folder with their sizes and mtimes
(zip: sizes, CRCs and dates), which key the decode-once cache (``celldiff.data.imagecache``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from celldiff.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
REPO_ROOT = Path(__file__).resolve().parents[2]
_LAYOUT_HINT = (
    "expected one folder per cell class, e.g. basophil/ eosinophil/ …, or the Mendeley PBC_dataset_normal_DIB zip"
)


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
        return open_reader(str(self.source), self.prefix, self.is_zip)


@contextlib.contextmanager
def open_reader(source: str, prefix: str, is_zip: bool) -> Iterator[Callable[[str], bytes]]:
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


def resolve_data_dir(data_dir: str) -> str:
    """A relative data_dir missing from the working directory is looked up in the repository.

    So the bundled default, ``data/pbc_sample``, works from any directory in a source checkout.
    """
    path = Path(data_dir).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return str(path)


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

