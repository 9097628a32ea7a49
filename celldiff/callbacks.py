"""Deprecated home of celldiff's callbacks, kept for old configs: ``class_path: celldiff.callbacks.SampleGrid``.

Configs (and the config.yaml that runs saved) written before the package redesign name
``celldiff.callbacks.SampleGrid``, ``InpaintingPanels``, ``AppendingCSVLogger`` and the others; they resolve
here, with a DeprecationWarning. Their homes today:

- ``celldiff.training.callbacks``: SampleGrid, InpaintingPanels, Throughput, RNGState, SaveSplit, log_image
- ``celldiff.training.prediction``: PredictionWriter
- ``celldiff.training.stopping``: GracefulStop, SaveOnSigterm, STOP
- ``celldiff.cli.checkpoints``: AtomicCheckpointIO, AtomicModelCheckpoint, CheckpointReadError,
  CheckpointWriteError, atomic_torch_save, check_checkpoint_file
- ``celldiff.cli.loggers``: AppendingCSVLogger
- ``celldiff.images``: image_grid, labelled_rows, save_png

Nothing inside celldiff imports this module.
"""

from __future__ import annotations

import warnings

from celldiff.cli.checkpoints import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    CheckpointReadError,
    CheckpointWriteError,
    atomic_torch_save,
    check_checkpoint_file,
)
from celldiff.cli.loggers import AppendingCSVLogger
from celldiff.images import image_grid, labelled_rows, save_png
from celldiff.training.callbacks import InpaintingPanels, RNGState, SampleGrid, SaveSplit, Throughput, log_image
from celldiff.training.prediction import PredictionWriter
from celldiff.training.stopping import STOP, GracefulStop, SaveOnSigterm

__all__ = [
    "STOP",
    "AppendingCSVLogger",
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "CheckpointReadError",
    "CheckpointWriteError",
    "GracefulStop",
    "InpaintingPanels",
    "PredictionWriter",
    "RNGState",
    "SampleGrid",
    "SaveOnSigterm",
    "SaveSplit",
    "Throughput",
    "atomic_torch_save",
    "check_checkpoint_file",
    "image_grid",
    "labelled_rows",
    "log_image",
    "save_png",
]

warnings.warn(
    "celldiff.callbacks is deprecated: use celldiff.training.callbacks (SampleGrid, InpaintingPanels, Throughput,"
    " RNGState, SaveSplit), celldiff.training.prediction.PredictionWriter, celldiff.training.stopping, celldiff.cli"
    " (checkpoints, loggers) or celldiff.images (in configs: class_path: celldiff.training.callbacks.SampleGrid)",
    DeprecationWarning,
    stacklevel=2,
)
