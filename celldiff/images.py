"""Image conversions and files: the one place uint8 becomes [-1, 1] and back, grids and PNGs.

Tensors are (N, C, H, W); arrays for files are (H, W, 3) uint8. Nothing here imports celldiff.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] (any shape) -> float32 in [-1, 1]; float input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images.float()


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape) -> uint8 [0, 255], rounding and clamping."""
    return ((x.detach().float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) uint8, or float in [-1, 1].
        nrow: Images per row; default about sqrt(N).
        padding: Pixels between tiles.

    Returns:
        (H', W', C) uint8 array.
    """
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def labelled_rows(rows: list[tuple[str, np.ndarray]], margin: int = 90) -> np.ndarray:
    """Stack image rows (H, W, 3) vertically with a text label left of each (PIL's built-in font)."""
    from PIL import ImageDraw

    width = max(r.shape[1] for _, r in rows)
    out = []
    for label, row in rows:
        canvas = Image.new("RGB", (margin + width, row.shape[0]), (255, 255, 255))
        canvas.paste(Image.fromarray(row), (margin, 0))
        ImageDraw.Draw(canvas).text((4, row.shape[0] // 2 - 5), label[: margin // 6], fill=(0, 0, 0))
        out.append(np.asarray(canvas))
    return np.concatenate(out)


def load_pngs(paths: list[Path]) -> Tensor:
    """Read image files into a (N, 3, H, W) uint8 tensor (writable copies)."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def save_png(array: np.ndarray, path: Path) -> None:
    """Save an (H, W, 3) uint8 array, writing to a temporary file first so a crash leaves no stub."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
