"""Shared helpers of the mask tests: seeded generators, the mask conventions, real cells at 64 px."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from tests.conftest import SAMPLE

SIZE = 64
NUCLEATED = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil")
IMAGES_PER_CLASS = 6


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_valid_mask(mask: torch.Tensor, size: int = SIZE) -> None:
    assert mask.shape == (1, size, size) and mask.dtype == torch.float32
    assert ((mask == 0) | (mask == 1)).all()
    assert 0 < mask.sum() < mask.numel(), "mask must be neither empty nor full"


def load_cell(path: Path, size: int = SIZE) -> torch.Tensor:
    """Centre-crop to the shorter side, bicubic resize, to (3, size, size) in [-1, 1]."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def luminance(images: torch.Tensor) -> torch.Tensor:
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]


def missing_fraction(mask: torch.Tensor) -> float:
    """Fraction of missing pixels (mask == 1), over all masks if batched."""
    return mask.float().mean().item()


def load_cells() -> dict[str, torch.Tensor]:
    """The first few images of each class, (N, 3, 64, 64) in [-1, 1]."""
    return {
        name: torch.stack([load_cell(p) for p in sorted((SAMPLE / name).glob("*.jpg"))[:IMAGES_PER_CLASS]])
        for name in (*NUCLEATED, "platelet")
    }
