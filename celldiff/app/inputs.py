"""What the page hands the app, made into an image and a mask: uploads, the editor's layers, presets.

Images are (H, W, 3) uint8 arrays at the user's own resolution; masks are (H, W) bool arrays,
**True = missing** (``celldiff.masks.shapes``' convention, 1 = missing). The editor shows the image framed on a
square canvas and a mask as a translucent layer over it (``editor_value``), and gives back what the user
painted on its layers (``mask_from_editor``: a pixel is missing where any layer has alpha > 0), so a preset
or a mask file can be refined with the brush and the eraser before Run. Every problem is an ``AppInputError`` whose message
the page shows as it is. Nothing here imports gradio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from celldiff.app.model import SAMPLE_CELLS
from celldiff.data.scan import IMAGE_SUFFIXES
from celldiff.data.user_images import read_image, read_mask
from celldiff.images import to_model_range
from celldiff.masks.nucleus import nucleus_mask
from celldiff.masks.shapes import box_mask, centre_mask

MAX_SIDE = 4096  # pixels per side of an uploaded image
PRESET_SIZE = 64  # presets are drawn at 64 x 64, the scale the mask shapes and the nucleus mask are tuned for
PRESETS = ("nucleus", "box", "centre")
MASK_COLOUR = (255, 0, 255)  # the brush and the presets paint in magenta
MASK_ALPHA = 150
EDITOR_SIDE = 720  # the editor's square canvas, in pixels: the image is framed on it (``frame_box``)
FRAME_COLOUR = (255, 255, 255)  # around an image that is not square
SAMPLES_PER_CLASS = 2


class AppInputError(ValueError):
    """Input the app cannot use; the message (one line) is shown in the page."""


def read_upload(path: str | Path | None) -> np.ndarray:
    """An uploaded image file as (H, W, 3) uint8 RGB (EXIF orientation applied, transparency on white).

    Raises:
        AppInputError: No file, a file that is not an image, or one over ``MAX_SIDE`` pixels per side.
    """
    if path is None:
        raise AppInputError("no image: upload a PNG or JPEG, or pick a sample cell")
    name = Path(path).name
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise AppInputError(f"{name} is not an image this app can read; upload a PNG or JPEG") from None
    except OSError as err:
        raise AppInputError(f"{name} could not be read ({err.__class__.__name__}); upload a PNG or JPEG") from None
    if max(width, height) > MAX_SIDE:
        raise AppInputError(f"{name} is {width} x {height} px; images up to {MAX_SIDE} px per side are accepted")
    try:
        return np.asarray(read_image(Path(path)))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise AppInputError(f"{name} could not be decoded ({err.__class__.__name__}): a damaged image?") from None


def sample_cells(root: Path = SAMPLE_CELLS, per_class: int = SAMPLES_PER_CLASS) -> dict[str, Path]:
    """The bundled sample cells to pick from: ``"erythroblast 1 (ERB_123.jpg)" -> path``, a few per class.

    Returns ``{}`` if the bundled sample is not next to the package (an installation without the repository).
    """
    if not root.is_dir():
        return {}
    cells = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
        for number, path in enumerate(files, start=1):
            cells[f"{class_dir.name} {number} ({path.name})"] = path
    return cells


def frame_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image of ``size`` = (W, H) sits on the editor's square canvas: (left, top, width, height).

    The image is scaled to fit ``EDITOR_SIDE`` and centred (Gradio's editor places a layer the page sets
    correctly only on a canvas of the background's own size, so the canvas is fixed and the image framed).
    """
    width, height = size
    scale = EDITOR_SIDE / max(width, height)
    box_width, box_height = max(1, round(width * scale)), max(1, round(height * scale))
    return (EDITOR_SIDE - box_width) // 2, (EDITOR_SIDE - box_height) // 2, box_width, box_height


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask at ``size`` = (W, H): a pixel is True if any part of it was (box filter, > 0)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) > 0


def overlay(missing: np.ndarray) -> np.ndarray:
    """The editor layer that shows a mask of the image: (S, S, 4) uint8 on the editor's canvas, translucent
    magenta where missing, clear elsewhere."""
    left, top, width, height = frame_box((missing.shape[1], missing.shape[0]))
    layer = np.zeros((EDITOR_SIDE, EDITOR_SIDE, 4), dtype=np.uint8)
    shown = np.asarray(Image.fromarray(missing.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)) > 0
    layer[top : top + height, left : left + width][shown] = (*MASK_COLOUR, MASK_ALPHA)
    return layer


def editor_value(image: np.ndarray, missing: np.ndarray | None = None) -> dict[str, Any]:
    """The image editor's value: ``image`` framed on the square canvas, and ``missing`` (if any) as a paint layer."""
    left, top, width, height = frame_box((image.shape[1], image.shape[0]))
    canvas = Image.new("RGB", (EDITOR_SIDE, EDITOR_SIDE), FRAME_COLOUR)
    canvas.paste(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS), (left, top))
    layers = [] if missing is None else [overlay(missing)]
    return {"background": np.asarray(canvas), "layers": layers, "composite": None}


def _as_array(layer: Any) -> np.ndarray:
    if isinstance(layer, (str, Path)):
        with Image.open(layer) as opened:
            return np.asarray(opened.convert("RGBA"))
    return np.asarray(layer)


def painted(layer: Any) -> np.ndarray:
    """Where a layer holds paint, (H, W) bool: alpha > 0 (RGBA / LA), else any non-zero value."""
    array = _as_array(layer)
    if array.ndim == 2:
        return array > 0
    if array.ndim == 3 and array.shape[2] in (2, 4):
        return array[..., -1] > 0
    if array.ndim == 3:
        return array.any(axis=2)
    raise AppInputError(f"the editor sent a layer of shape {array.shape}; reload the page")


def mask_from_editor(value: dict[str, Any] | None, size: tuple[int, int]) -> np.ndarray:
    """The missing region the user painted, (H, W) bool at ``size`` = (W, H) of the image: any layer's paint.

    A layer of the editor's square canvas is cropped to the image's frame (``frame_box``); a layer of any
    other size is taken as covering the image. Either is scaled to the image, a pixel missing if any paint
    touches it.

    Raises:
        AppInputError: No editor value (no image loaded).
    """
    if not isinstance(value, dict) or value.get("background") is None:
        raise AppInputError("no image: upload a PNG or JPEG, or pick a sample cell")
    width, height = size
    left, top, box_width, box_height = frame_box(size)
    missing = np.zeros((height, width), dtype=bool)
    for layer in value.get("layers") or []:
        paint = painted(layer)
        if paint.shape == (EDITOR_SIDE, EDITOR_SIDE):
            paint = paint[top : top + box_height, left : left + box_width]
        missing |= paint if paint.shape == (height, width) else _resized_mask(paint, size)
    return missing


def check_missing(missing: np.ndarray) -> None:
    """A mask that leaves something to inpaint and something known.

    Raises:
        AppInputError: An empty mask, or one covering the whole image.
    """
    if not missing.any():
        raise AppInputError("the mask is empty: paint the region to fill in with the brush, or choose a preset")
    if missing.all():
        raise AppInputError("the mask covers the whole image: nothing is known to inpaint from;"
                            " use the Generate tab for cells from scratch")  # fmt: skip


def _upscale(mask: torch.Tensor, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """A (1, S, S) {0, 1} mask at ``size`` = (W, H): nearest (shapes) or bilinear then >= 1/2 (smooth outlines)."""
    small = Image.fromarray(mask[0].numpy().astype(np.uint8) * 255)
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(small.resize(size, resample)) >= 128


def preset_mask(name: str, image: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """A preset mask for ``image`` (H, W, 3) uint8 and a note for the page: (H, W) bool, True = missing.

    Presets are drawn at 64 x 64 (the image squashed to a square, as the model sees it) and scaled back:
    ``nucleus``: the stained nucleus (``celldiff.masks.nucleus.nucleus_mask``; the centre square where none is
    found); ``box``: one box of 30-50 % of the side, placed by ``seed``; ``centre``: the centred square of
    ``centre_mask`` (37.5 % of the side).

    Raises:
        AppInputError: An unknown preset name.
    """
    size = (image.shape[1], image.shape[0])
    if name == "nucleus":
        square = Image.fromarray(image).resize((PRESET_SIZE, PRESET_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
        tensor = to_model_range(torch.from_numpy(np.array(square)).permute(2, 0, 1))
        mask, found = nucleus_mask(tensor, generator=None, return_found=True)
        note = "the nucleus, from the stain" if found else "no nucleus found in the stain: the centre square instead"
        return _upscale(mask, size, smooth=True), note
    if name == "box":
        if not 0 <= int(seed) < 2**63:
            raise AppInputError(f"the seed must be between 0 and 2^63 - 1, got {int(seed)}")
        generator = torch.Generator().manual_seed(int(seed))
        mask = box_mask(PRESET_SIZE, generator, num_boxes=(1, 1), box_size=(0.3, 0.5))
        return _upscale(mask, size, smooth=False), f"a box placed by seed {int(seed)}"
    if name == "centre":
        return _upscale(centre_mask(PRESET_SIZE, None), size, smooth=False), "the centre square"
    raise AppInputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def mask_from_file(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """An uploaded mask file (white = missing, black = known; any size) at ``size`` = (W, H) of the image.

    Raises:
        AppInputError: No file, not an image, a colour image, a mask that is not black and white, empty or full.
    """
    if path is None:
        raise AppInputError("no mask file: upload a black-and-white PNG (white = missing)")
    name = Path(path).name
    try:
        with Image.open(path) as probe:
            if max(probe.size) > MAX_SIDE:
                raise AppInputError(f"mask file {name} is {probe.size[0]} x {probe.size[1]} px; masks up to {MAX_SIDE} px per side are accepted")
        return read_mask(Path(path), size)
    except AppInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise AppInputError(f"mask file {name} is not an image; upload a black-and-white PNG (white = missing)") from None
    except OSError as err:
        raise AppInputError(f"mask file {name} could not be read ({err.__class__.__name__})") from None
    except ValueError as err:
        raise AppInputError(f"mask file {name}: {err}") from None


def masked_preview(image: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """The input as the model sees it: missing pixels mid-grey (``masked_image``'s 0 in [-1, 1])."""
    preview = image.copy()
    preview[missing] = 128
    return preview
