"""TRANSITIONAL: removed by D. The old flat ``celldiff.user_images``: import from ``celldiff.data.user_images``."""

from celldiff.data.user_images import paste_full_resolution, read_image, read_mask  # noqa: F401
