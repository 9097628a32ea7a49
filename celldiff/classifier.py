"""Deprecated home of the cell classifier: configs and checkpoints from before the redesign name it.

``class_path: celldiff.classifier.CellClassifier`` keeps resolving (with a DeprecationWarning naming
the new path): the LightningModule is ``celldiff.training.classifier.CellClassifier``, the network
``celldiff.nets.classifier.CellResNet``, and loading a trained classifier as the judge of
generated cells, with the checkpoint-kind helpers, ``celldiff.evaluation.judge``. Old checkpoints'
state dicts load into both (their keys move under ``net.``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# old name -> (module, name) today
_MOVED = {
    "CellClassifier": ("celldiff.training.classifier", "CellClassifier"),
    "BasicBlock": ("celldiff.nets.classifier", "BasicBlock"),
    "load_classifier": ("celldiff.evaluation.judge", "load_judge"),
    **{
        name: ("celldiff.evaluation.judge", name)
        for name in (
            "CheckpointKindError",
            "read_checkpoint",
            "checkpoint_class_path",
            "describe_kind",
            "DIFFUSION_CLASS_PATH",
            "CLASSIFIER_CLASS_PATH",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new = _MOVED[name]
    warnings.warn(f"celldiff.classifier.{name} is deprecated; use {module}.{new}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), new)


def __dir__() -> list[str]:
    return sorted(_MOVED)
