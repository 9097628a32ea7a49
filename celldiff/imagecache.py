"""TRANSITIONAL: removed by D. The old flat ``celldiff.imagecache``; import from ``celldiff.data.scan``
(scan_dataset), ``celldiff.data.decode`` (load_image) and ``celldiff.data.imagecache`` (the cache) instead.
"""

from celldiff.data.scan import scan_dataset  # noqa: F401
