"""The celldiff weights file: one network's state dict as safetensors, described by its header's metadata.

A weights file (``weights/NAME.safetensors``, written by ``celldiff export``) holds tensors and a JSON
header, nothing else: reading it never unpickles anything. Its metadata (strings only) carries
``celldiff_format`` (``FORMAT_TAG``), the ``class_path`` of the model it comes from and that model's
``hparams`` as JSON; ``celldiff.training.weights`` writes and builds models from it, and
``celldiff.evaluation.judge`` loads the classifier from it. Here are only the file's bytes: the header read
and checked without loading a tensor (``read_weights_metadata``), the tensors, and the atomic write.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from celldiff.errors import UsageError, file_problem

FORMAT_KEY = "celldiff_format"
FORMAT_NAME = "celldiff-weights"
FORMAT_VERSION = 1
FORMAT_TAG = f"{FORMAT_NAME}/{FORMAT_VERSION}"
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_ZIP_MAGIC = b"PK\x03\x04"


class WeightsFileError(UsageError):
    """A weights file that cannot be used: not safetensors, truncated, not celldiff's, or not this model's (exit 2)."""


def _name(path: str | Path, option: str) -> str:
    return f"{option} {path}" if option else str(path)


def is_weights_file(path: str | Path) -> bool:
    """True for a path named ``*.safetensors``, or a file whose first bytes are a safetensors header (not a zip)."""
    if str(path).lower().endswith(SUFFIX):
        return True
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and not head.startswith(_ZIP_MAGIC) and head[8:9] == b"{"


def read_header(path: str | Path, option: str = "") -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` (tensor entries and ``__metadata__``) and the size of its data part.

    Reads the 8-byte header length and the JSON header only (no tensor is loaded) and checks that the
    file holds every tensor the header lists. Raises ``WeightsFileError``, one line naming the file (and
    ``option``, the flag it was given with), when it is missing, not safetensors, or truncated.
    """
    where = _name(path, option)
    file = Path(path)
    problem = file_problem(file, where, "weights", f"a weights file ({SUFFIX}, from celldiff export)")
    if problem:
        raise WeightsFileError(problem)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            first = handle.read(8)
            length = int.from_bytes(first, "little") if len(first) == 8 else -1
            raw = handle.read(length) if 0 < length <= MAX_HEADER_BYTES else b""
    except OSError as err:
        raise WeightsFileError(f"{where}: cannot be read ({err.strerror or err})") from None
    if first.startswith(_ZIP_MAGIC):
        raise WeightsFileError(
            f"{where}: not a safetensors file but a zip archive (a Lightning checkpoint? give it as a .ckpt file,"
            " or convert it with celldiff export)"
        )
    if length < 2 or length > MAX_HEADER_BYTES:
        raise WeightsFileError(f"{where}: not a safetensors file ({size} bytes, with no valid header length)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        if size < 8 + length and raw.lstrip().startswith(b"{"):
            raise WeightsFileError(f"{where}: truncated ({size} bytes; its header alone needs {8 + length})") from None
        raise WeightsFileError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{where}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise WeightsFileError(f"{where}: not a safetensors file (tensor {key!r} has no data offsets)")
        end = max(end, offsets[1])
    data = size - 8 - length
    if data < end:
        raise WeightsFileError(f"{where}: truncated ({size} bytes; its tensors need {8 + length + end})")
    return header, data


def read_weights_metadata(path: str | Path, option: str = "") -> dict[str, Any]:
    """The metadata of a celldiff weights file, read and checked without loading a tensor.

    Args:
        path: The ``.safetensors`` file.
        option: The command-line flag it came with (``--ckpt_path``), named in errors.

    Returns:
        The header's metadata (strings), except ``hparams``: the model's hyperparameters as a dict.

    Raises:
        WeightsFileError: one line naming the file: not safetensors, truncated, not a celldiff weights
            file (no ``celldiff_format``), of a newer format, or with damaged metadata.
    """
    where = _name(path, option)
    header, _ = read_header(path, option)
    meta = header.get("__metadata__") or {}
    tag = meta.get(FORMAT_KEY) if isinstance(meta, dict) else None
    if not tag:
        raise WeightsFileError(
            f"{where}: a safetensors file but not a celldiff weights file (no {FORMAT_KEY} in its metadata);"
            " celldiff export writes them from a checkpoint"
        )
    name, _, version = str(tag).partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise WeightsFileError(f"{where}: unknown weights format {tag!r}; expected {FORMAT_TAG}")
    if int(version) > FORMAT_VERSION:
        raise WeightsFileError(f"{where}: written by a newer celldiff (format {tag}); this one reads {FORMAT_TAG}")
    try:
        hparams = json.loads(meta.get("hparams", ""))
    except (json.JSONDecodeError, TypeError):
        hparams = None
    if not isinstance(hparams, dict) or not meta.get("class_path"):
        raise WeightsFileError(f"{where}: damaged metadata (expected class_path and hparams as a JSON object)")
    return {**meta, "hparams": hparams}


def read_tensors(path: str | Path, option: str = "") -> dict[str, Tensor]:
    """Every tensor of a weights file (as stored: float16), after ``read_header``'s checks; no unpickling."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_header(path, option)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise WeightsFileError(f"{_name(path, option)}: not a readable safetensors file ({first})") from None


def same_weights_file(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool:
    """Whether ``path`` already holds exactly these tensors and this metadata (the header's key order aside)."""
    try:
        header, _ = read_header(path)
        stored = read_tensors(path)
    except WeightsFileError:
        return False
    if header.get("__metadata__") != dict(metadata) or stored.keys() != tensors.keys():
        return False
    return all(stored[k].dtype == v.dtype and torch.equal(stored[k], v) for k, v in tensors.items())


def write_weights_file(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` with ``metadata`` as safetensors: to a temporary file beside ``path``, fsync, rename.

    A crash or a full disk leaves any previous file intact and no temporary file behind.
    """
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata))
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
