"""Deprecated path of :class:`celldiff.training.module.DiffusionModule`, kept for old configs and checkpoints.

Configs and checkpoints written before the package redesign name ``celldiff.module.DiffusionModule`` (their
``class_path`` and pickled references); they resolve here, with a DeprecationWarning. New code imports
``celldiff.training.module.DiffusionModule``. Nothing inside celldiff imports this module.
"""

from __future__ import annotations

import warnings

from celldiff.diffusion.loss import TIMESTEP_BUCKETS
from celldiff.diffusion.samplers import SAMPLERS
from celldiff.errors import NonFiniteLossError, UnsupportedPrecisionError
from celldiff.seeds import generators_from_seeds
from celldiff.seeds import mix_seed as _mix_seed
from celldiff.training.module import FP16_TRUE_MESSAGE, DiffusionModule
from celldiff.training.nonfinite import NONFINITE_POLICIES
from celldiff.training.optim import lr_factor

__all__ = [
    "FP16_TRUE_MESSAGE",
    "NONFINITE_POLICIES",
    "SAMPLERS",
    "TIMESTEP_BUCKETS",
    "DiffusionModule",
    "NonFiniteLossError",
    "UnsupportedPrecisionError",
    "_mix_seed",
    "generators_from_seeds",
    "lr_factor",
]

warnings.warn(
    "celldiff.module is deprecated: use celldiff.training.module.DiffusionModule "
    "(in configs: class_path: celldiff.training.module.DiffusionModule)",
    DeprecationWarning,
    stacklevel=2,
)
