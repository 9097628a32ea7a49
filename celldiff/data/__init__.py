"""Blood-cell images in, uint8 batches out: scan (``scan``), decode once (``decode``, ``imagecache``),
split (``split``), datasets and the training order (``datasets``), a user's own images
(``user_images``), and the Lightning data module (``datamodule``). Import from the submodules;
``CellDataModule`` is also here, the name configs and users reach for.
"""

from celldiff.data.datamodule import CellDataModule

__all__ = ["CellDataModule"]
