"""A user's own images and masks for ``celldiff predict`` (Phase 2 inpainting).

``--data.predict_images IMG_DIR --data.predict_masks MASK_DIR``: every image (JPEG, PNG, ... of
any size) needs a mask with the same file stem in MASK_DIR: a 1-channel (or grey RGB) PNG where
white = missing, of any size (it is resized to the image). The model works at ``image_size``:
the image is resized to a square for it, and the result is pasted back at the input's own
resolution inside the mask only, so every known pixel of the output equals the input exactly.

Files that cannot be used are reported one line each; the others still run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from celldiff.data.scan import IMAGE_SUFFIXES
from celldiff.errors import DataError
from celldiff.seeds import sample_seed

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")
# A mask is "binary-like" when almost every pixel is near black or near white (antialiased
# edges are fine; a photograph is not).
GREY_FRACTION_LIMIT = 0.05


@dataclasses.dataclass(frozen=True)
class UserItem:
    """One usable (image, mask) pair of files."""

    image_path: Path
    mask_path: Path


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Read a user mask as bool (H, W) at ``size`` = (W, H) of its image; True = missing.

    Raises:
        ValueError: The mask is not a 1-channel or grey image, not binary-like, empty or full.
    """
    with Image.open(path) as mask_image:
        mask_image.load()
        mode = mask_image.mode
        if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "P"):
            grey = np.asarray(mask_image.convert("L"), dtype=np.uint8)
        elif mode in ("RGB", "RGBA"):
            rgb = np.asarray(mask_image.convert("RGB"), dtype=np.int16)
            if np.abs(rgb - rgb[..., :1]).max() > 8:
                raise ValueError(f"mask is a colour image ({mode}); expected a 1-channel black/white PNG")
            grey = rgb[..., 0].astype(np.uint8)
        else:
            raise ValueError(f"mask has mode {mode}; expected a 1-channel black/white PNG")
    grey_fraction = float(((grey > 32) & (grey < 223)).mean())
    if grey_fraction > GREY_FRACTION_LIMIT:
        raise ValueError(
            f"mask is not binary-like ({grey_fraction:.0%} of pixels are grey); expected white = missing, black = known"
        )
    resized = Image.fromarray(grey).resize(size, Image.Resampling.NEAREST)
    missing = np.asarray(resized) >= 128
    if not missing.any():
        raise ValueError("mask is empty (no white pixel): nothing to inpaint")
    if missing.all():
        raise ValueError("mask is full (all white): nothing is known")
    return missing


def read_image(path: Path) -> Image.Image:
    """Read an image as RGB (EXIF orientation applied)."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if image.mode.startswith("I"):
            array = np.asarray(image, dtype=np.float64)
            scale = 255.0 / max(array.max(), 1.0)
            return Image.fromarray((array * scale).round().astype(np.uint8)).convert("RGB")
        return image.convert("RGB")


def low_res_mask(missing: np.ndarray, image_size: int) -> np.ndarray:
    """Downscale a full-resolution mask so that every missing pixel lies in a missing low-res pixel."""
    area = Image.fromarray(missing.astype(np.uint8) * 255).resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(area) > 0


class UserImageDataset(Dataset):
    """Pairs of (image, mask) from two folders, validated up front.

    Items: ``image`` uint8 (3, S, S), ``mask`` uint8 (1, S, S) (1 = missing), ``index``,
    ``noise_seed`` (``sample_seed(predict_seed, index)``), ``label`` (-1: unknown), ``path`` and
    ``mask_path`` (the files, for the full-resolution output).

    Args:
        images_dir: Folder of images (any size).
        masks_dir: Folder of masks with the same stems (white = missing).
        image_size: The model's image size.
        predict_seed: Base of each item's ``noise_seed``.
    """

    def __init__(self, images_dir: str | Path, masks_dir: str | Path, image_size: int, predict_seed: int = 0) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.image_size, self.predict_seed = image_size, predict_seed
        for name, folder in (("predict_images", self.images_dir), ("predict_masks", self.masks_dir)):
            if not folder.is_dir():
                what = (
                    "is a file, not a folder"
                    if folder.exists()
                    else f"does not exist (resolved to {folder.absolute()})"
                )
                raise DataError(f"data.{name} {folder} {what}; expected a folder of image files")
        masks = {p.stem: p for p in sorted(self.masks_dir.iterdir()) if p.suffix.lower() in MASK_SUFFIXES}
        self.items: list[UserItem] = []
        self.problems: list[str] = []
        images = [p for p in sorted(self.images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"data.predict_images {self.images_dir} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        for path in images:
            problem = self._check(path, masks.get(path.stem))
            if problem:
                self.problems.append(f"{path}: {problem}")
                print(f"celldiff: skipped {path}: {problem}", file=sys.stderr)
            else:
                self.items.append(UserItem(path, masks[path.stem]))
        if not self.items:
            raise DataError(f"no usable image/mask pair in {self.images_dir} and {self.masks_dir} (see the lines above)")

    def _check(self, image_path: Path, mask_path: Path | None) -> str | None:
        if mask_path is None:
            return f"no mask with the stem '{image_path.stem}' in {self.masks_dir}"
        try:
            image = read_image(image_path)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            return f"unreadable image ({err.__class__.__name__}: {err})"
        try:
            read_mask(mask_path, image.size)
        except (OSError, UnidentifiedImageError) as err:
            return f"unreadable mask {mask_path} ({err.__class__.__name__})"
        except ValueError as err:
            return f"{mask_path.name}: {err}"
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image = read_image(item.image_path)
        missing = read_mask(item.mask_path, image.size)
        size = self.image_size
        small = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))
        return {
            "image": torch.from_numpy(small.copy()).permute(2, 0, 1),
            "mask": torch.from_numpy(low_res_mask(missing, size)).to(torch.uint8)[None],
            "label": -1,
            "index": index,
            "noise_seed": sample_seed(self.predict_seed, index),
            "path": str(item.image_path),
            "mask_path": str(item.mask_path),
        }


def paste_full_resolution(image_path: str | Path, mask_path: str | Path, generated: np.ndarray) -> np.ndarray:
    """The input at its own resolution with the generated region pasted inside the mask.

    Args:
        image_path: The user's image.
        mask_path: Its mask (white = missing).
        generated: The model's output (S, S, 3) uint8.

    Returns:
        (H, W, 3) uint8: equal to the input wherever the mask is black.
    """
    image = read_image(Path(image_path))
    return paste_generated(np.asarray(image), read_mask(Path(mask_path), image.size), generated)


def paste_generated(image: np.ndarray, missing: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """``generated`` (S, S, 3) uint8, resized (bicubic) to ``image`` (H, W, 3), inside ``missing`` (H, W) bool.

    Returns (H, W, 3) uint8 equal to ``image`` wherever ``missing`` is False.
    """
    height, width = image.shape[:2]
    upsampled = np.asarray(Image.fromarray(generated).resize((width, height), Image.Resampling.BICUBIC))
    return np.where(missing[..., None], upsampled, image)


__all__ = ["UserImageDataset", "paste_full_resolution", "paste_generated", "read_mask", "read_image", "low_res_mask"]
