"""Inpainting masks: random generators for training, a stain-based nucleus mask, and the model's condition.

Conventions (enforced by :func:`check_mask`):

- A mask is a float32 tensor of shape (1, H, W), or (B, 1, H, W) batched, with values exactly 0.0 or
  1.0. **1 = missing** (to be generated), 0 = known (observed). The sampler's ``missing_mask`` is the
  same thing.
- Images are float tensors in [-1, 1], shape (3, H, W) or (B, 3, H, W).
- The masked image carries no information inside the mask: ``masked_image = image * (1 - mask)``, so
  missing pixels read 0, i.e. mid-grey in [-1, 1]. The model tells "missing" from "grey" by the mask
  channel, which :func:`inpainting_condition` appends: the inpainting U-Net sees
  ``cat(x_t, masked_image, mask)``, 3 + 3 + 1 = 7 channels.

Generators take ``(size, generator, ...)`` and return a (1, size, size) float32 {0, 1} mask on the CPU.
Ranges given as ``(low, high)`` are sampled uniformly, both ends included; fractions are of the image
side. The output depends only on the arguments and the generator's state (no global RNG), and each
call advances the generator. :func:`nucleus_mask` instead reads the image: it finds the stained
nucleus by colour deconvolution (Ruifrok & Johnston 2001) and Otsu's threshold, and needs the
generator only for its fallback. :class:`MaskSampler` draws from a weighted mixture of all of them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_TYPES = ("box", "brush", "centre", "half", "outpaint", "nucleus")
HALF_SIDES = ("left", "right", "top", "bottom")
DEFAULT_MASK_WEIGHTS: dict[str, float] = {
    "box": 1.0,
    "brush": 1.0,
    "centre": 0.5,
    "half": 0.5,
    "outpaint": 0.5,
    "nucleus": 1.0,
}

# Standard H&E(-DAB) stain vectors in optical-density space (Ruifrok & Johnston 2001; the matrix
# scikit-image uses). Rows: haematoxylin, eosin, DAB (the third spans the rest of OD space).
# May-Grünwald-Giemsa nuclei are dark purple-blue and load on the haematoxylin vector; red cells and
# eosinophil granules load on eosin.
_STAIN_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_STAIN_OD = _STAIN_OD / _STAIN_OD.norm(dim=1, keepdim=True)
_OD_TO_STAINS = torch.linalg.inv(_STAIN_OD).to(torch.float32)  # od (..., 3) @ this -> stain amounts


# --------------------------------------------------------------------------- conventions
def check_mask(mask: Tensor, image: Tensor | None = None, check_values: bool = True) -> None:
    """Raise ValueError unless ``mask`` follows the conventions (and matches ``image`` if given).

    Args:
        mask: (1, H, W) or (B, 1, H, W), float32, values in {0, 1}.
        image: Optional (C, H, W) or (B, C, H, W) image the mask belongs to.
        check_values: Also check that every value is 0 or 1. This reads the data (a device sync on
            a GPU), the other checks only look at shapes.
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


def inpainting_condition(image: Tensor, mask: Tensor) -> Tensor:
    """The channels the inpainting model sees next to x_t: ``cat(masked_image, mask)``.

    Shapes are checked; values are trusted, so no device sync happens here (use :func:`check_mask`
    where masks come from outside). Any floating mask dtype is accepted (see :func:`masked_image`).

    Args:
        image: (B, 3, H, W) in [-1, 1], or unbatched (3, H, W).
        mask: (B, 1, H, W), or unbatched (1, H, W); 1 = missing.

    Returns:
        (B, 4, H, W) (or (4, H, W)), in ``image``'s dtype: channels 0-2 the masked image, 3 the mask.
    """
    known = masked_image(image, mask)
    return torch.cat([known, mask.to(image.dtype)], dim=-3)


def mask_coverage(mask: Tensor) -> float:
    """Fraction of missing pixels (mask == 1), over all masks if batched."""
    return mask.float().mean().item()


# --------------------------------------------------------------------------- random helpers
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


# --------------------------------------------------------------------------- generators
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


# --------------------------------------------------------------------------- nucleus mask
def hematoxylin_score(image: Tensor) -> Tensor:
    """Haematoxylin amount per pixel by colour deconvolution (Ruifrok & Johnston 2001).

    RGB -> optical density ``-log10((I * 255 + 1) / 256)`` -> stain amounts with the standard H&E
    matrix; the haematoxylin channel is returned. Background and red cells score ~0, nuclei ~0.5-1.

    Args:
        image: (3, H, W) or (B, 3, H, W) in [-1, 1].

    Returns:
        (1, H, W) or (B, 1, H, W) float32.
    """
    intensity = ((image.float().clamp(-1, 1) + 1) * 127.5 + 1) / 256  # in (0, 1], avoids log(0)
    optical_density = -torch.log10(intensity)
    red, green, blue = _OD_TO_STAINS[:, 0].tolist()
    return (
        red * optical_density[..., 0:1, :, :]
        + green * optical_density[..., 1:2, :, :]
        + blue * optical_density[..., 2:3, :, :]
    )


def _otsu_threshold(score: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold per image (Otsu 1979): maximises the between-class variance. (B, 1, H, W) -> (B,)."""
    flat = score.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = (high - low).clamp_min(1e-12)
    index = ((flat - low) / span * bins).long().clamp(0, bins - 1)
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=score.device)
    hist.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    prob = hist / flat.shape[1]
    centres = (torch.arange(bins, dtype=torch.float64, device=score.device) + 0.5) / bins
    weight_below = prob.cumsum(1)
    mean_below = (prob * centres).cumsum(1)
    mean_total = mean_below[:, -1:]
    between = (mean_total * weight_below - mean_below) ** 2 / (weight_below * (1 - weight_below)).clamp_min(1e-12)
    best = between[:, :-1].argmax(1)  # threshold after bin `best`: pixels in higher bins are foreground
    return (low[:, 0] + (best + 1).to(flat.dtype) / bins * span[:, 0]).to(score.dtype)


def _flat_max_filter(flat: Tensor, padded_width: int, radius: int, disk: bool) -> Tensor:
    """Max filter of images that are zero-padded by ``radius`` on every side and flattened row-major.

    A shift by (dy, dx) is then a shift by ``dy * padded_width + dx`` of the flat index, so every step
    is a slice of contiguous memory: on a CPU several times faster than ``max_pool2d``, a convolution
    or 2-D slicing for 64 x 64 masks. A running max along rows, then one max per row of the window.

    Args:
        flat: (B, L), values >= 0 (binary masks or component labels).
        padded_width: Row length of the padded images.
        radius: Window radius.
        disk: Window ``dy**2 + dx**2 <= radius**2`` if True, else the (2 radius + 1)^2 square.

    Returns:
        (B, L): the filtered values at every position of the original image (the padding holds junk).
    """
    length = flat.shape[1]
    reach = radius * padded_width + radius  # largest flat offset inside the window
    rows = [flat[:, radius : length - radius]]  # rows[w][:, j]: max over x - w .. x + w at position j + radius
    for w in range(1, radius + 1):
        neighbours = torch.maximum(flat[:, radius - w : length - radius - w], flat[:, radius + w : length - radius + w])
        rows.append(torch.maximum(rows[-1], neighbours))
    out = None
    for dy in range(-radius, radius + 1):
        half_width = math.isqrt(radius * radius - dy * dy) if disk else radius
        start = reach + dy * padded_width - radius
        piece = rows[half_width][:, start : start + length - 2 * reach]
        out = piece if out is None else torch.maximum(out, piece)
    return F.pad(out, (reach, reach))


def _max_filter(values: Tensor, radius: int, disk: bool = True) -> Tensor:
    """Max over a disk (or square) window around each pixel of (..., H, W) values >= 0; outside reads 0."""
    if radius <= 0:
        return values
    height, width = values.shape[-2:]
    flat = F.pad(values.reshape(-1, height, width), (radius,) * 4).reshape(
        -1, (height + 2 * radius) * (width + 2 * radius)
    )
    out = _flat_max_filter(flat, width + 2 * radius, radius, disk)
    out = out.reshape(-1, height + 2 * radius, width + 2 * radius)[:, radius : radius + height, radius : radius + width]
    return out.reshape(values.shape)


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation by a disk; outside the image counts as background."""
    return _max_filter(mask, radius)


def _erode(mask: Tensor, radius: int) -> Tensor:
    """Binary erosion by a disk; outside the image counts as foreground (objects cut by the border keep their edge)."""
    return 1 - _max_filter(1 - mask, radius)


def _label_components(mask: Tensor, eight_connected: int | None = None) -> tuple[Tensor, int]:
    """Connected-component labels of (N, 1, H, W) {0, 1} masks.

    Label propagation (every pixel takes the largest label among its neighbours inside the mask)
    plus pointer jumping (a pixel takes the label held by the pixel its label names: labels only grow
    and always name a pixel of the same component), which cuts the iterations from a component's
    length to a handful (about 10 for the cells here).

    Args:
        mask: (N, 1, H, W) {0, 1}.
        eight_connected: The first this many masks are labelled 8-connected, the rest 4-connected
            (None: all 8-connected). Foreground 8- with background 4-connected keeps holes honest.

    Returns:
        Labels (N, H * W) int64, 0 for background, one distinct value per component; and a bound
        above every label (the size of ``bincount``-style tables).
    """
    count, _, height, width = mask.shape
    eight_connected = count if eight_connected is None else eight_connected
    row = width + 2
    inside = F.pad(mask.reshape(count, height, width), (1, 1, 1, 1)).reshape(count, -1)
    length = inside.shape[1]
    # A pixel's label is its flat index in the padded image; index 0 (a padding corner) is never
    # inside, so 0 can mean background and gathering at 0 reads 0. Float32 is exact below 2**24.
    labels = torch.arange(length, device=mask.device, dtype=torch.float32) * inside
    for _ in range(height * width):
        # Shifts by (dy, dx) are shifts by dy * row + dx of the flat index: contiguous slices.
        centre = labels[:, 1:-1]  # centre[:, j] is position j + 1
        across = torch.maximum(torch.maximum(labels[:, :-2], labels[:, 2:]), centre)
        above_below = torch.cat([across[:eight_connected], centre[eight_connected:]])
        grown = torch.maximum(
            torch.maximum(above_below[:, : length - 2 - 2 * row], above_below[:, 2 * row :]),
            across[:, row : length - 2 - row],
        )
        grown = F.pad(grown, (row + 1, row + 1)) * inside
        jumped = grown.gather(1, grown.long())
        if torch.equal(jumped, labels):
            break
        labels = jumped
    labels = labels.reshape(count, height + 2, row)[:, 1:-1, 1:-1].reshape(count, height * width)
    return labels.long(), length


def _select_components(mask: Tensor, keep_fraction: float, centre_distance: float | None) -> tuple[Tensor, Tensor]:
    """Keep the large central 8-connected components of (B, 1, H, W) {0, 1} masks.

    A component is central if one of its pixels lies within ``centre_distance`` x the image side of
    the image centre (None: all are). The central components of at least ``keep_fraction`` x the
    largest central one's area are kept.

    Returns:
        The kept mask (B, 1, H, W) and the largest central component's area in pixels (B,).
    """
    batch, _, height, width = mask.shape
    labels, num_labels = _label_components(mask)
    areas = torch.zeros(batch, num_labels, device=mask.device)
    areas.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    areas[:, 0] = 0  # label 0: background
    if centre_distance is not None:
        y = torch.arange(height, device=mask.device, dtype=torch.float32) - (height - 1) / 2
        x = torch.arange(width, device=mask.device, dtype=torch.float32) - (width - 1) / 2
        distance = (y[:, None] ** 2 + x[None, :] ** 2).sqrt().flatten().expand(batch, height * width)
        nearest = torch.full((batch, num_labels), math.inf, device=mask.device)
        nearest.scatter_reduce_(1, labels, distance, reduce="amin")
        areas = areas * (nearest <= centre_distance * min(height, width))
    largest = areas.amax(1)
    kept = (areas.gather(1, labels) >= keep_fraction * largest[:, None]) & (labels > 0)
    return kept.float().reshape(mask.shape), largest


def _fill_holes(mask: Tensor) -> Tensor:
    """Add the background regions of (B, 1, H, W) {0, 1} masks that do not reach the image border.

    Background is taken 4-connected (the foreground 8-connected), so a diagonal chain of pixels
    closes a hole.
    """
    batch, _, height, width = mask.shape
    labels, num_labels = _label_components(1 - mask, eight_connected=0)
    border = torch.ones(height, width, dtype=torch.bool, device=mask.device)
    border[1:-1, 1:-1] = False
    reaches_border = torch.zeros(batch, num_labels, dtype=torch.bool, device=mask.device)
    reaches_border.scatter_(1, labels[:, border.flatten()], True)
    reaches_border[:, 0] = True  # label 0: the foreground itself
    return (~reaches_border.gather(1, labels)).float().reshape(mask.shape) + mask


def nucleus_mask(
    image: Tensor,
    generator: torch.Generator | None = None,
    dilate: int = 2,
    open_radius: int = 1,
    close_radius: int = 1,
    min_score: float = 0.25,
    keep_fraction: float = 0.2,
    centre_distance: float | None = 0.25,
    min_area: float = 0.004,
    max_area: float = 0.7,
    fallback_fraction: Sequence[float] = (0.25, 0.5),
    return_found: bool = False,
) -> Tensor | tuple[Tensor, Tensor | bool]:
    """Mask the stained nucleus (or nuclei) of a blood-cell image.

    In May-Grünwald-Giemsa smears the nucleus is the dark purple-blue, haematoxylin-like stain; red
    cells and eosinophil granules are pink-orange (eosin-like) and the cytoplasm is pale. Steps:

    1. :func:`hematoxylin_score` (colour deconvolution).
    2. Threshold at Otsu's value on that score, but never below ``min_score``.
    3. Opening (removes specks) and closing (joins the speckled chromatin), disks in pixels.
    4. Keep the 8-connected components near the centre (a pixel within ``centre_distance`` x the
       side of it: PBC images are centred on their cell) of at least ``keep_fraction`` x the largest
       one's area, so every lobe of a segmented nucleus stays and neighbouring cells, stray platelets
       and debris go.
    5. Dilate by ``dilate`` pixels so the mask also covers the nucleus boundary, and fill holes (the
       pale centre of a ring-shaped band nucleus is masked too: no known islands inside).

    If nothing is found (largest component under ``min_area`` of the image, or the mask over
    ``max_area``: a uniform or washed-out image) the result is the fallback ``centre_mask(size,
    generator, fallback_fraction)``, which ``return_found=True`` reports. Platelets have no nucleus
    but stain dark too: their mask is the platelet itself (small), which is what inpainting wants.
    Basophil granules are dark and cover the nucleus: their mask is most of the cell.

    Morphology sizes are in pixels and suit 64 x 64 cells (the whole 360 px PBC image at 64 px);
    scale them for larger images. Batched input is processed in one pass (~1 ms per image on a CPU
    core at 64 x 64); the result depends only on the image, except for fallbacks.

    Args:
        image: (3, H, W) or (B, 3, H, W) in [-1, 1].
        generator: Randomness for the fallback square's size only; None gives the middle of
            ``fallback_fraction``.
        dilate: Final dilation radius in pixels (disk).
        open_radius: Radius of the opening that removes specks, in pixels.
        close_radius: Radius of the closing that joins chromatin, in pixels.
        min_score: Lowest haematoxylin optical density counted as nucleus, whatever Otsu says.
        keep_fraction: Components smaller than this fraction of the largest are dropped.
        centre_distance: Components with no pixel this close to the centre (fraction of the side)
            are dropped; None keeps components anywhere.
        min_area: Smallest largest-component area, as a fraction of the image, that counts as found.
        max_area: Largest mask area, as a fraction of the image, before dilation, that counts as found.
        fallback_fraction: ``fraction`` of the fallback centre square.
        return_found: Also return whether a nucleus was found (bool, or a (B,) bool tensor if batched).

    Returns:
        The mask, (1, H, W) or (B, 1, H, W) float32, 1 = nucleus (missing); with ``return_found``,
        ``(mask, found)``.
    """
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must have shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if image.shape[-1] != image.shape[-2]:
        raise ValueError(
            f"nucleus_mask needs square images (the fallback is a centre square), got {tuple(image.shape)}"
        )
    batched = image.ndim == 4
    images = image if batched else image[None]
    size = images.shape[-1]

    score = hematoxylin_score(images)
    threshold = _otsu_threshold(score).clamp_min(min_score).reshape(-1, 1, 1, 1)
    mask = (score > threshold).float()
    mask = _dilate(_erode(mask, open_radius), open_radius)
    mask = _erode(_dilate(mask, close_radius), close_radius)
    mask, largest = _select_components(mask, keep_fraction, centre_distance)
    area = mask.flatten(1).sum(1)
    found = (largest >= min_area * size * size) & (area <= max_area * size * size)
    mask = _fill_holes(_dilate(mask, dilate))

    missing = (~found).nonzero().flatten().tolist()
    for index in missing:
        mask[index] = centre_mask(size, generator, fallback_fraction).to(mask.device)
    if not batched:
        mask, found = mask[0], bool(found[0])
    return (mask, found) if return_found else mask


# --------------------------------------------------------------------------- the mixture
_GENERATORS: dict[str, Callable[..., Tensor]] = {
    "box": box_mask,
    "brush": brush_mask,
    "centre": centre_mask,
    "half": half_mask,
    "outpaint": outpaint_mask,
    "nucleus": nucleus_mask,
}


def _check_names(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in MASK_TYPES]
    if unknown:
        raise ValueError(f"unknown mask type(s) {unknown}; valid mask types are {list(MASK_TYPES)}")


class MaskSampler:
    """A weighted mixture of mask generators, drawn once per image at training time.

    Example: ``MaskSampler({"box": 1, "brush": 1, "nucleus": 2}, options={"box": {"num_boxes": (1, 5)}})``;
    ``MaskSampler.from_spec("nucleus")`` for a single type.

    Args:
        mask_types: Weight per mask type (any of ``MASK_TYPES``); weights are relative, >= 0, and a
            zero weight disables a type.
        options: Keyword arguments per type, passed to its generator (e.g. ``{"nucleus": {"dilate": 3}}``).
    """

    def __init__(
        self,
        mask_types: Mapping[str, float] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        weights = dict(DEFAULT_MASK_WEIGHTS if mask_types is None else mask_types)
        options = dict(options or {})
        _check_names(list(weights) + list(options))
        if not weights or any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mask_types weights must be finite, >= 0 and not all zero, got {weights}")
        for name, kwargs in options.items():
            parameters = list(inspect.signature(_GENERATORS[name]).parameters)[2:]  # after (size|image, generator)
            bad = [key for key in kwargs if key not in parameters or key == "return_found"]
            if bad:
                raise ValueError(f"unknown option(s) {bad} for mask type {name!r}; valid: {parameters}")
        self.names: tuple[str, ...] = tuple(name for name, weight in weights.items() if weight > 0)
        total = sum(weights[name] for name in self.names)
        self.probabilities: dict[str, float] = {name: weights[name] / total for name in self.names}
        self.options: dict[str, dict[str, Any]] = {name: dict(kwargs) for name, kwargs in options.items()}
        self._probs = torch.tensor([self.probabilities[name] for name in self.names], dtype=torch.float64)
        self.last_type: str | None = None  # the type the last __call__ drew (for inspection / logging)
        self.last_types: list[str] = []  # the types the last batch() drew, one per image

    @classmethod
    def from_spec(
        cls,
        spec: str | Sequence[str] | Mapping[str, float],
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> MaskSampler:
        """Build from ``"nucleus"``, ``"box,brush"`` / ``["box", "brush"]`` (equal weights) or a weight dict."""
        if isinstance(spec, str):
            names = [part.strip() for part in spec.split(",") if part.strip()]
            weights: Mapping[str, float] = dict.fromkeys(names, 1.0)
        elif isinstance(spec, Mapping):
            weights = spec
        else:
            weights = dict.fromkeys(spec, 1.0)
        return cls(weights, options)

    def __repr__(self) -> str:
        probabilities = ", ".join(f"{name}: {p:.3f}" for name, p in self.probabilities.items())
        return f"MaskSampler({{{probabilities}}}, options={self.options})"

    def choose(self, generator: torch.Generator, count: int | None = None) -> str | list[str]:
        """Draw mask type name(s) according to the weights (one name, or a list of ``count``)."""
        indices = torch.multinomial(self._probs, 1 if count is None else count, replacement=True, generator=generator)
        names = [self.names[i] for i in indices.tolist()]
        return names[0] if count is None else names

    def make(self, name: str, image: Tensor, generator: torch.Generator) -> Tensor:
        """The mask of type ``name`` for ``image`` (3, H, W), with this sampler's options."""
        _check_names([name])
        kwargs = self.options.get(name, {})
        if name == "nucleus":
            return nucleus_mask(image, generator, **kwargs).to(image.device)
        return _GENERATORS[name](image.shape[-1], generator, **kwargs).to(image.device)

    def _check_image(self, image: Tensor, ndim: int) -> None:
        if image.ndim != ndim or image.shape[-3] != 3 or image.shape[-1] != image.shape[-2]:
            expected = "(3, H, H)" if ndim == 3 else "(B, 3, H, H)"
            raise ValueError(f"expected a square image batch of shape {expected}, got {tuple(image.shape)}")

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """A mask (1, H, W) for one image (3, H, W) in [-1, 1]; the type drawn is kept in ``last_type``."""
        self._check_image(image, 3)
        self.last_type = self.choose(generator)
        return self.make(self.last_type, image, generator)

    def batch(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Masks (B, 1, H, W) for images (B, 3, H, W), nucleus masks computed in one batched pass.

        Draws all B types first (kept in ``last_types``), then the masks in order, so it consumes the
        generator differently from B calls of ``__call__`` (both are deterministic).
        """
        self._check_image(images, 4)
        names = self.last_types = self.choose(generator, images.shape[0])
        masks = torch.empty(images.shape[0], 1, *images.shape[-2:], device=images.device)
        nucleus_rows = [i for i, name in enumerate(names) if name == "nucleus"]
        if nucleus_rows:
            kwargs = self.options.get("nucleus", {})
            masks[nucleus_rows] = nucleus_mask(images[nucleus_rows], generator, **kwargs).to(images.device)
        for i, name in enumerate(names):
            if name != "nucleus":
                masks[i] = self.make(name, images[i], generator)
        return masks
