"""Decoding one image file robustly: any mode to RGB, centre crop, resize, truncation caught.

``load_image`` turns the bytes of one file into an (S, S, 3) uint8 array or raises
``UnusableImageError`` with a short reason; ``celldiff.data.imagecache`` runs it once per file.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from celldiff.errors import UnusableImageError


@contextlib.contextmanager
def strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files instead of padding them grey; restore the caller's value."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if not previous:  # the usual case: touch nothing, so concurrent threads cannot race on it
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _wide_to_uint8(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float grey to 8 bit over its nominal range (not by clipping)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        values = values / 257.0  # 65535 → 255: the nominal 16-bit range
    elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    else:  # signed or out-of-range data has no nominal range: stretch what is there
        low, high = values.min(), values.max()
        values = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _wide_to_uint8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels become white, like the slide background, not black.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX


def load_image(source: bytes | str | os.PathLike[str] | BinaryIO, image_size: int) -> np.ndarray:
    """Decode one image to a centre-cropped, resized RGB array.

    JPEGs are decoded with DCT scaling (``draft``) to the smallest size still ≥ ``image_size``,
    which is several times faster than a full decode; the min-side square is then resized with
    antialiased bicubic. EXIF orientation is ignored: cells have no orientation.

    Args:
        source: Encoded bytes, a path, or a binary file object.
        image_size: Side S of the square output.

    Returns:
        uint8 array of shape (S, S, 3).

    Raises:
        UnusableImageError: empty, not an image, truncated or corrupt, with a short reason.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            source = Path(source).read_bytes()
        except OSError as error:
            raise UnusableImageError(f"unreadable ({error.strerror or error})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnusableImageError("empty file")
        source = io.BytesIO(source)
    with strict_truncation():
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            raise UnusableImageError("not an image") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            truncated = "truncated" in str(error).lower()  # e.g. cut inside the header
            raise UnusableImageError("truncated image" if truncated else f"unreadable image ({error})") from None
        with image:
            kind = image.format or "image"
            width, height = float(image.size[0]), float(image.size[1])
            try:
                if kind == "JPEG" and min(width, height) > image_size:
                    drafted = image.draft("RGB", (image_size, image_size))
                    if drafted is not None:  # the part of the reduced image that holds data
                        width, height = drafted[1][2], drafted[1][3]
                image.load()
                rgb = _to_rgb(image)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                if "truncated" in str(error).lower() or "broken data stream" in str(error):
                    raise UnusableImageError(f"truncated {kind}") from None
                raise UnusableImageError(f"corrupt {kind} ({error})") from None
            if width < 1 or height < 1:
                raise UnusableImageError("empty image (0 pixels)")
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            if (width, height) == rgb.size:  # not drafted: whole-pixel offsets keep a same-size crop exact
                left, top = float(int(left)), float(int(top))
            box = (left, top, left + side, top + side)
            if box != (0, 0, image_size, image_size) or rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            return np.array(rgb, dtype=np.uint8)
