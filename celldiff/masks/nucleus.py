"""The nucleus mask: the stained nucleus found by colour deconvolution, and its morphology helpers.

:func:`nucleus_mask` reads the image: it finds the stained nucleus by colour deconvolution (Ruifrok &
Johnston 2001) and Otsu's threshold (Otsu 1979), cleans it up with opening, closing, connected
components and hole filling, and needs a generator only for its fallback (a centre square). Images
are float tensors in [-1, 1], (3, H, W) or (B, 3, H, W); masks follow ``celldiff.masks.shapes``'
conventions (float32 {0, 1}, 1 = missing). Everything runs batched in a fixed number of tensor
operations, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from celldiff.masks.shapes import centre_mask

# Standard H&E(-DAB) stain vectors in optical-density space (Ruifrok & Johnston 2001; the matrix
# scikit-image uses). Rows: haematoxylin, eosin, DAB (the third spans the rest of OD space).
# May-Grünwald-Giemsa nuclei are dark purple-blue and load on the haematoxylin vector; red cells and
# eosinophil granules load on eosin.
_STAIN_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_STAIN_OD = _STAIN_OD / _STAIN_OD.norm(dim=1, keepdim=True)
_OD_TO_STAINS = torch.linalg.inv(_STAIN_OD).to(torch.float32)  # od (..., 3) @ this -> stain amounts


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
