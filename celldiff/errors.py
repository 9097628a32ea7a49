"""The exceptions behind celldiff's one-line errors; ``celldiff.cli`` maps each to an exit code.

Each carries a message that says what was wrong, which file or value, and what was expected. Nothing
here imports celldiff.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """The data cannot be used as given (a folder, a file, a data-module argument); exit code 2."""


class CellDataWarning(UserWarning):
    """Something in the data that was handled but deserves attention (skipped files, duplicates)."""


class UnusableImageError(ValueError):
    """One image file cannot be decoded (it is skipped with a warning, never fatal)."""


class UsageError(Exception):
    """A command-line value that cannot work; one line, exit code 2."""


class PartialFailure(Exception):
    """Some inputs failed (each reported already) while the rest ran; exit code 1."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; exit code 3."""


class UnsupportedPrecisionError(ValueError):
    """A ``--trainer.precision`` that cannot train this model correctly; exit code 2."""


def file_problem(path: str | Path, where: str, what: str, expected: str) -> str | None:
    """Why ``path`` is not a readable file (missing, or a directory), as one line starting with ``where``; else None."""
    file = Path(path)
    if not file.exists():
        return f"{where}: no such {what} file"
    if not file.is_file():
        return f"{where} is a directory; expected {expected}"
    return None
