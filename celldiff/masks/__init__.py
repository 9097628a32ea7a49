"""Inpainting masks: shapes drawn from a generator (``shapes``), the stain-based nucleus mask
(``nucleus``), and the one registry of families with the weighted mixture (``mixture``).

Masks are float32 (1, H, W) / (B, 1, H, W) with 1 = missing; see ``celldiff.masks.shapes``.
"""

from celldiff.masks.mixture import DEFAULT_MASK_WEIGHTS, FAMILIES, MASK_TYPES, MaskSampler, mask_families

__all__ = [
    "DEFAULT_MASK_WEIGHTS",
    "FAMILIES",
    "MASK_TYPES",
    "MaskSampler",
    "mask_families",
]
