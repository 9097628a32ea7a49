"""Blood-cell images in, uint8 batches out: scan (``scan``), decode once (``decode``, ``imagecache``),
split (``split``), datasets and the training order (``datasets``), a user's own images
(``user_images``), and the Lightning data module (``datamodule``).
"""

# TRANSITIONAL: removed by D. Every name but CellDataModule is an old `from celldiff.data import ...`
# name still imported somewhere; each importer should import it from the module named on its line.
from celldiff.data.datamodule import CellDataModule
from celldiff.data.datasets import MaskAssigner, NoiseDataset, resolve_classes  # TRANSITIONAL: removed by D
from celldiff.data.imagecache import build_cache, load_cache  # TRANSITIONAL: removed by D
from celldiff.data.scan import resolve_data_dir, scan_dataset  # TRANSITIONAL: removed by D
from celldiff.errors import CellDataWarning, DataError  # TRANSITIONAL: removed by D
from celldiff.images import to_uint8 as tensor_to_uint8  # TRANSITIONAL: removed by D
from celldiff.seeds import mix_seed  # TRANSITIONAL: removed by D
from celldiff.seeds import sample_seed as noise_seed_for  # TRANSITIONAL: removed by D

__all__ = [
    "CellDataModule",
    # TRANSITIONAL: removed by D
    "CellDataWarning",
    "DataError",
    "MaskAssigner",
    "NoiseDataset",
    "build_cache",
    "load_cache",
    "mix_seed",
    "noise_seed_for",
    "resolve_classes",
    "resolve_data_dir",
    "scan_dataset",
    "tensor_to_uint8",
]
