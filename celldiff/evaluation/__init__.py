"""Judging generated cells: distances, the judge, the report, masked-region metrics, baselines, the run.

``distances`` (Fréchet and kernel distances with their floors, precision/recall, nearest neighbours,
memorisation), ``judge`` (the classifier checkpoint loaded as a network; how it sees cells),
``report`` (metrics.json / metrics.md), ``masked`` (inpainting metrics inside the mask),
``baselines`` (non-learned fills), ``external`` (LPIPS / Inception from local weights),
``inputs`` (every evaluate input checked first), ``sharding`` (generation split across ranks) and
``run`` (``celldiff evaluate``'s work). Import from the submodules.
"""

from __future__ import annotations

import importlib
from typing import Any

# TRANSITIONAL: removed by D (with the imports above). The names the flat ``celldiff/evaluation.py`` had,
# resolved lazily from their submodules (no importer inside the repository is left; import from the submodule).
_FLAT_NAMES = {
    "distances": "FLOOR_DRAWS frechet_distance frechet_distance_floor frechet_distance_gaussians frechet_floor_details "
    "kernel_distance kernel_distance_floor memorisation_report nearest_neighbours precision_recall",
    "external": "ALEXNET_WEIGHTS_FILE INCEPTION_WEIGHTS_FILE default_inception_weights default_lpips_weights "
    "inception_metrics lpips_distances lpips_network",
    "judge": "classifier_report extract_features",
    "report": "SMALL_N_NOTE markdown_table write_report",
}
_HOME = {name: module for module, names in _FLAT_NAMES.items() for name in names.split()}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"celldiff.evaluation.{_HOME[name]}"), name)
