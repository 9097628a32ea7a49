"""Mask shapes drawn from a generator alone, and the conventions every mask follows.

Conventions (checked by :func:`check_mask`):

- A mask is a float32 tensor of shape (1, H, W), or (B, 1, H, W) batched, with values exactly 0.0 or
  1.0. **1 = missing** (to be generated), 0 = known (observed). The sampler's ``missing_mask`` is the
  same thing.
- Images are float tensors in [-1, 1], shape (3, H, W) or (B, 3, H, W).
- The masked image carries no information inside the mask: ``masked_image = image * (1 - mask)``, so
  missing pixels read 0, i.e. mid-grey in [-1, 1]. The model tells "missing" from "grey" by the mask
  channel, which ``celldiff.diffusion.denoiser.inpainting_input`` appends: the inpainting U-Net sees
  ``cat(x_t, masked_image, mask)``, 3 + 3 + 1 = 7 channels.

Shapes take ``(size, generator, **options)`` and return a (1, size, size) float32 {0, 1} mask on the
CPU. Ranges given as ``(low, high)`` are sampled uniformly, both ends included; fractions are of the
image side. The output depends only on the arguments and the generator's state (no global RNG), and
each call advances the generator. Masks that read the image live in ``celldiff.masks.nucleus``;
``celldiff.masks.mixture`` holds the one registry of families and the weighted mixture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

HALF_SIDES = ("left", "right", "top", "bottom")


# --------------------------------------------------------------------------- conventions
def check_mask(mask: Tensor, image: Tensor | None = None, check_values: bool = True) -> None:
    """Raise ValueError unless ``mask`` follows the conventions (and matches ``image`` if given).

    Args:
        mask: (1, H, W) or (B, 1, H, W), float32, values in {0, 1}.
        image: Optional (C, H, W) or (B, C, H, W) image the mask belongs to.
        check_values: Also check that every value is 0 or 1. This reads the data (a device sync on
            a GPU), the other checks only look at shapes.

    Used on every family's trial mask when a ``MaskSampler`` is checked (``MaskSampler.check``), so
    a family that breaks the conventions fails at start-up.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.float32:
        raise ValueError(f"mask must be float32 (values 0.0 / 1.0, 1 = missing), got dtype {mask.dtype}")
    _check_mask_shape(mask, image)
    if check_values and not ((mask == 0) | (mask == 1)).all():
        bad = mask[(mask != 0) & (mask != 1)]
        raise ValueError(
            f"mask values must be exactly 0.0 or 1.0 (1 = missing); found {bad.numel()} other values, "
            f"e.g. {bad.flatten()[0].item():.4g}"
        )


def _check_mask_shape(mask: Tensor, image: Tensor | None) -> None:
    if mask.ndim not in (3, 4) or mask.shape[-3] != 1:
        raise ValueError(f"mask must have shape (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if image is None:
        return
    if image.ndim != mask.ndim:
        raise ValueError(f"mask {tuple(mask.shape)} and image {tuple(image.shape)} must both be batched or both not")
    if image.shape[-2:] != mask.shape[-2:] or (mask.ndim == 4 and image.shape[0] != mask.shape[0]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}: "
            "expected the same batch size and H, W with one mask channel"
        )


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """The known part of ``image``: ``image * (1 - mask)``, exactly 0 (mid-grey) where missing.

    Args:
        image: (C, H, W) or (B, C, H, W) in [-1, 1].
        mask: (1, H, W) or (B, 1, H, W), 1 = missing. Any floating dtype is accepted here: 0 and 1
            are exact in all of them, and Lightning's ``bf16-true`` / ``16-true`` precision casts
            floating batch tensors, masks included. Values are not read (no device sync).
    """
    if not mask.is_floating_point():
        raise ValueError(f"mask must be floating point (float32 by convention), got dtype {mask.dtype}")
    _check_mask_shape(mask, image)
    return image * (1 - mask.to(image.dtype))


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be (low, high) with {low} <= low <= high <= {high}, got {tuple(value)}")
    return float(value[0]), float(value[1])


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> list[float]:
    return (low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)).tolist()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer in [low, high], both included."""
    return int(torch.randint(int(low), int(high) + 1, (1,), generator=generator).item())


def _side(fraction: float, size: int) -> int:
    return min(size, max(1, round(fraction * size)))


# --------------------------------------------------------------------------- shapes
def box_mask(
    size: int,
    generator: torch.Generator,
    num_boxes: Sequence[int] = (1, 3),
    box_size: Sequence[float] = (0.1, 0.4),
) -> Tensor:
    """Union of random axis-aligned rectangles, each fully inside the image.

    Args:
        size: Image side in pixels.
        generator: Source of randomness.
        num_boxes: (min, max) number of rectangles.
        box_size: (min, max) side length as a fraction of ``size``; height and width drawn separately
            and rounded to whole pixels (at least 1).

    Returns:
        (1, size, size) float32. Coverage is at least one minimal box, ``round(min * size)**2 / size**2``.
    """
    low, high = _check_range("num_boxes", num_boxes, 1, math.inf)
    side_low, side_high = _check_range("box_size", box_size, 0.0, 1.0)
    mask = torch.zeros(1, size, size)
    for _ in range(_randint(generator, int(low), int(high))):
        height, width = (_side(f, size) for f in _uniform(generator, 2, side_low, side_high))
        top = _randint(generator, 0, size - height)
        left = _randint(generator, 0, size - width)
        mask[:, top : top + height, left : left + width] = 1.0
    return mask


def _draw_segments(size: int, segments: list[tuple[float, float, float, float, float]]) -> Tensor:
    """Pixels within distance r of any segment (y0, x0, y1, x1, r): a round brush. Returns (size, size) bool.

    Each segment is sampled every ``r / 2`` (at most 1 px) and every pixel within r of a sample is
    set: the union of those disks differs from the exact stroke by under 3 % of r, and the work is
    proportional to the stroke area, in a fixed number of tensor operations (a convolution or a
    pixel-by-segment distance table costs several times more on a CPU).
    """
    table = []  # per segment: first sample index, y0, x0, dy, dx, 1 / (count - 1), r^2
    total = 0
    for y0, x0, y1, x1, radius in segments:
        count = math.ceil(math.hypot(y1 - y0, x1 - x0) / min(radius / 2, 1.0)) + 1
        table.append((total, y0, x0, y1 - y0, x1 - x0, 1.0 / max(count - 1, 1), radius * radius, count))
        total += count
    table_t = torch.tensor([row[:-1] for row in table], dtype=torch.float64)
    counts = torch.tensor([row[-1] for row in table])
    per_sample = table_t[torch.repeat_interleave(torch.arange(len(table)), counts, output_size=total)]
    fraction = (torch.arange(total, dtype=torch.float64) - per_sample[:, 0]) * per_sample[:, 5]
    points = per_sample[:, 1:3] + fraction[:, None] * per_sample[:, 3:5]  # (N, 2) as (y, x)
    centre = points.round()
    # Candidate pixels centre + (oy, ox), |oy|, |ox| <= reach; squared distances to the sample, separably.
    reach = math.ceil(max(segment[4] for segment in segments)) + 1
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64)
    delta_sq = (offsets - (points - centre)[:, :, None]) ** 2  # (N, 2, K)
    near = delta_sq[:, 0, :, None] + delta_sq[:, 1, None, :] <= per_sample[:, 6, None, None]  # (N, K, K)
    # Draw on a canvas padded by `reach`, so that no index leaves it, then crop.
    padded = size + 2 * reach
    base = (centre[:, 0] * padded + centre[:, 1]).long() + reach * (padded + 1)
    window = torch.arange(-reach, reach + 1)
    index = base[:, None, None] + (window[:, None] * padded + window[None, :])
    canvas = torch.zeros(padded * padded).index_add_(0, index.flatten(), near.flatten().float())
    return canvas.reshape(padded, padded)[reach : reach + size, reach : reach + size] > 0


def brush_mask(
    size: int,
    generator: torch.Generator,
    num_strokes: Sequence[int] = (1, 4),
    width: Sequence[float] = (0.04, 0.12),
    vertices: Sequence[int] = (4, 10),
    length: Sequence[float] = (0.08, 0.25),
    max_turn: float = 0.75 * math.pi,
) -> Tensor:
    """Free-form brush strokes, after the training masks of Yu et al. 2019 (DeepFill v2, "Free-Form
    Image Inpainting with Gated Convolution", Alg. 1).

    Each stroke is a random walk: a start point anywhere, then ``vertices`` straight segments of random
    length, each turning by up to ``max_turn`` from the last and clipped to the image, drawn with a
    round brush of one width per stroke (a pixel is missing if it lies within the brush radius of the
    stroke, up to the sampling described in ``_draw_segments``; joints and ends are round).

    Args:
        size: Image side in pixels.
        generator: Source of randomness (one fixed-size draw per call).
        num_strokes: (min, max) number of strokes.
        width: (min, max) brush diameter as a fraction of ``size`` (radius at least 0.5 px).
        vertices: (min, max) number of segments per stroke.
        length: (min, max) segment length as a fraction of ``size``.
        max_turn: Largest change of direction between segments, in radians.

    Returns:
        (1, size, size) float32.
    """
    stroke_low, stroke_high = (int(v) for v in _check_range("num_strokes", num_strokes, 1, math.inf))
    width_low, width_high = _check_range("width", width, 0.0, 1.0)
    vertex_low, vertex_high = (int(v) for v in _check_range("vertices", vertices, 1, math.inf))
    length_low, length_high = _check_range("length", length, 0.0, math.inf)
    per_stroke = 5 + 2 * vertex_high  # segment count, start y, x, angle, width, then (turn, length) per segment
    draws = torch.rand(1 + stroke_high * per_stroke, generator=generator, dtype=torch.float64).tolist()
    num = stroke_low + min(int(draws[0] * (stroke_high - stroke_low + 1)), stroke_high - stroke_low)
    segments = []
    for k in range(num):
        stroke = draws[1 + k * per_stroke : 1 + (k + 1) * per_stroke]
        num_segments = vertex_low + min(int(stroke[0] * (vertex_high - vertex_low + 1)), vertex_high - vertex_low)
        y, x, angle = stroke[1] * (size - 1), stroke[2] * (size - 1), 2 * math.pi * stroke[3]
        radius = max(0.5, 0.5 * size * (width_low + (width_high - width_low) * stroke[4]))
        for turn, step in zip(stroke[5 : 5 + 2 * num_segments : 2], stroke[6 : 6 + 2 * num_segments : 2], strict=True):
            angle += max_turn * (2 * turn - 1)
            step = size * (length_low + (length_high - length_low) * step)
            y_next = min(max(y + step * math.sin(angle), 0.0), size - 1.0)
            x_next = min(max(x + step * math.cos(angle), 0.0), size - 1.0)
            segments.append((y, x, y_next, x_next, radius))
            y, x = y_next, x_next
    return _draw_segments(size, segments).to(torch.float32)[None]


def centre_mask(size: int, generator: torch.Generator | None, fraction: Sequence[float] = (0.25, 0.5)) -> Tensor:
    """A centred square.

    The side is ``fraction * size`` rounded to a whole number of pixels of the same parity as ``size``,
    so that the square is exactly centred (equal margins on all four sides).

    Args:
        size: Image side in pixels.
        generator: Source of randomness for the side; None uses the middle of ``fraction``.
        fraction: (min, max) side of the square as a fraction of ``size``.

    Returns:
        (1, size, size) float32.
    """
    low, high = _check_range("fraction", fraction, 0.0, 1.0)
    value = (low + high) / 2 if generator is None else _uniform(generator, 1, low, high)[0]
    margin = min(max(round((size - value * size) / 2), 0), (size - 1) // 2)
    mask = torch.zeros(1, size, size)
    mask[:, margin : size - margin, margin : size - margin] = 1.0
    return mask


def half_mask(size: int, generator: torch.Generator, sides: Sequence[str] = HALF_SIDES) -> Tensor:
    """One half of the image missing: the ``left``, ``right``, ``top`` or ``bottom`` half.

    Args:
        size: Image side in pixels.
        generator: Source of randomness (which side).
        sides: Sides to choose from, uniformly.

    Returns:
        (1, size, size) float32; exactly half the pixels missing for even ``size``
        (``size // 2`` rows or columns for odd).
    """
    if not sides or any(side not in HALF_SIDES for side in sides):
        raise ValueError(f"sides must be a non-empty subset of {HALF_SIDES}, got {tuple(sides)}")
    side = sides[_randint(generator, 0, len(sides) - 1)]
    half = size // 2
    mask = torch.zeros(1, size, size)
    if side == "left":
        mask[:, :, :half] = 1.0
    elif side == "right":
        mask[:, :, size - half :] = 1.0
    elif side == "top":
        mask[:, :half, :] = 1.0
    else:
        mask[:, size - half :, :] = 1.0
    return mask


def outpaint_mask(size: int, generator: torch.Generator, band: Sequence[float] = (0.1, 0.25)) -> Tensor:
    """A border band missing on all four sides; the centre is known (outpainting).

    Args:
        size: Image side in pixels.
        generator: Source of randomness.
        band: (min, max) band width as a fraction of ``size``, rounded to ``b`` whole pixels
            (1 <= b <= (size - 1) // 2, so the centre is never empty).

    Returns:
        (1, size, size) float32 with coverage exactly ``1 - ((size - 2 b) / size) ** 2``.
    """
    low, high = _check_range("band", band, 0.0, 0.5)
    width = min(max(1, round(_uniform(generator, 1, low, high)[0] * size)), (size - 1) // 2)
    mask = torch.ones(1, size, size)
    mask[:, width : size - width, width : size - width] = 0.0
    return mask


def full_mask(size: int, generator: torch.Generator | None) -> Tensor:
    """Every pixel missing: generation from nothing, so that one inpainting model also generates.

    Args:
        size: Image side in pixels.
        generator: Unused (the mask is fixed); accepted so the family has the common signature.

    Returns:
        (1, size, size) float32 of ones.
    """
    return torch.ones(1, size, size)
