"""Seeds: every random draw that must be reproducible is a pure function of integers.

Image i of a prediction depends only on (seed, i), whatever the batch size, the device count or the
order; training noise depends only on (seed, step), masks and flips on (seed, epoch, position). No
module-level RNG anywhere: an explicit ``torch.Generator`` per draw. Nothing here imports celldiff.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def sample_seed(predict_seed: int, index: int) -> int:
    """Noise seed of prediction sample ``index``: fixed whatever the batch size or device count."""
    return (predict_seed * 1_000_003 + index) % 2**63


def generators_from_seeds(seeds: Sequence[int] | Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, so sample i is the same whatever the batch it is drawn in."""
    if isinstance(seeds, Tensor):
        seeds = seeds.tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
