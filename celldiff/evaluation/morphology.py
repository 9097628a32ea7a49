"""Morphological fidelity: segment nucleus and cell, measure them, compare real and generated per class.

``segment`` finds, in each uint8 image, the nucleus (the haematoxylin stain of
``celldiff.masks.nucleus``) and the whole white cell (pixels more purple than the red cells around
it, CIELAB a* - b*, joined to the nucleus and cut from touching cells); ``morphology_features``
measures them (``FEATURES``: areas and the diameter as fractions of the image, so they do not depend
on the resolution; solidity; lobes; mean colours 0-255). A cell with no nucleus or no cell gets NaN
everywhere and ``failed`` True. ``morphology_distances`` gives, per class and feature, the
Wasserstein-1 distance between the real and generated values over the real cells' standard deviation,
next to its floor: real cells in place of the generated ones (``celldiff.evaluation.report``'s
``morphology_markdown`` and ``morphology_figure`` draw them). docs/morphology.md shows the
segmentation on real cells of each class and where it fails. Sizes in pixels suit 64 x 64 cells
and scale with the side. Everything is batched torch except the convex hulls (a short loop per cell).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from celldiff.masks.nucleus import (
    _dilate,
    _erode,
    _fill_holes,
    _label_components,
    _otsu_threshold,
    _select_components,
    hematoxylin_score,
)

FEATURES = (
    "nucleus_area", "cell_area", "nc_ratio", "nucleus_solidity", "nucleus_lobes", "cell_diameter",
    "nucleus_red", "nucleus_green", "nucleus_blue", "cytoplasm_red", "cytoplasm_green", "cytoplasm_blue",
)  # fmt: skip
REFERENCE_SIDE = 64  # the side the pixel sizes below are tuned for; they scale with the side
CELL_THRESHOLD = 16.0  # CIELAB a* - b* above which a pixel is white cell (red cells ~3-15, cytoplasm ~20-45)
CELL_MARGIN = 6.0  # ... and at least this far above the red cells' level in the image
NUCLEUS_MIN_SCORE = 0.25  # haematoxylin optical density below which nothing is nucleus (as nucleus_mask)
MIN_NUCLEUS_AREA = 0.004  # fraction of the image: smaller, no nucleus was found
MAX_NUCLEUS_AREA = 0.7
MAX_CELL_AREA = 0.85  # larger: the cell was not told from the background (a washed-out image)
JOIN_RADIUS = 4  # nucleus pieces this close (px at 64; gaps up to 3 px) to the central one are its lobes
SPLIT_GAP = 0.38  # haematoxylin gap between a stained cytoplasm and its nucleus (chromatin: ~0.15-0.3)
LOBE_EROSION = 2  # px at 64: the nucleus is eroded by this disk before its lobes are counted
LOBE_FRACTION = 0.1  # a lobe holds at least this fraction of the eroded nucleus
_CHUNK = 256  # images segmented at once (bounds the memory of the labelling)


def _as_nchw_uint8(images: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, 3, H, W) or (N, H, W, 3), numpy or torch -> a uint8 (N, 3, H, W) tensor."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected uint8 images (N, 3, H, W) or (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return (x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)).contiguous()


def _radius(pixels: int, side: int) -> int:
    """A radius tuned at 64 px, at this side (at least 1)."""
    return max(1, round(pixels * side / REFERENCE_SIDE))


def lab_purple(images: Tensor) -> Tensor:
    """CIELAB a* - b* (D65) of uint8 (N, 3, H, W) images: (N, 1, H, W). Purple-blue high, cream and pink low."""
    rgb = images.float() / 255
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = torch.einsum("ij,njhw->nihw", to_xyz, linear) / torch.tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return 500 * (f[:, 0:1] - f[:, 1:2]) - 200 * (f[:, 1:2] - f[:, 2:3])


def _largest_overlap(mask: Tensor, seed: Tensor) -> Tensor:
    """The 8-connected component of each (N, 1, H, W) mask that holds the most ``seed`` pixels."""
    labels, bound = _label_components(mask)
    overlap = torch.zeros(len(mask), bound)
    overlap.scatter_add_(1, labels, seed.flatten(1))
    overlap[:, 0] = -1  # the background never wins
    best = overlap.argmax(1, keepdim=True)
    return ((labels == best) & (labels > 0)).float().reshape(mask.shape)


def _fill_small_holes(mask: Tensor, max_pixels: float) -> Tensor:
    """Fill the holes (background not reaching the border, 4-connected) of at most ``max_pixels``."""
    labels, bound = _label_components(1 - mask, eight_connected=0)
    height, width = mask.shape[-2:]
    sizes = torch.zeros(len(mask), bound).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    border = torch.ones(height, width, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    open_to_border = torch.zeros(len(mask), bound, dtype=torch.bool).scatter_(1, labels[:, border.flatten()], True)
    small = (sizes <= max_pixels) & ~open_to_border
    small[:, 0] = False
    return mask + small.gather(1, labels).float().reshape(mask.shape)


def _stain(score: Tensor, threshold: Tensor, radius: int) -> Tensor:
    """Haematoxylin above the per-image threshold (N,), opened (specks) and closed (speckled chromatin)."""
    stain = (score > threshold.view(-1, 1, 1, 1)).float()
    return _erode(_dilate(_dilate(_erode(stain, radius), radius), radius), radius)


def _masked_otsu(score: Tensor, mask: Tensor, bins: int = 128) -> tuple[Tensor, Tensor]:
    """Otsu's threshold of (N, 1, H, W) scores inside masks, and the gap between the two classes' means."""
    low, high = -0.2, 1.5  # haematoxylin optical densities of stained cells lie inside
    index = ((score.clamp(low, high - 1e-6) - low) / (high - low) * bins).long().flatten(1)
    hist = torch.zeros(len(score), bins, dtype=torch.float64).scatter_add_(1, index, mask.flatten(1).double())
    centres = low + (torch.arange(bins, dtype=torch.float64) + 0.5) / bins * (high - low)
    weight, moment = hist.cumsum(1), (hist * centres).cumsum(1)
    total, total_moment = weight[:, -1:], moment[:, -1:]
    below, above = moment / weight.clamp_min(1e-9), (total_moment - moment) / (total - weight).clamp_min(1e-9)
    between = weight * (total - weight) * (below - above) ** 2
    best = between[:, :-1].argmax(1, keepdim=True)
    threshold = low + (best[:, 0] + 1).double() / bins * (high - low)
    gap = (above.gather(1, best) - below.gather(1, best))[:, 0] * (between.gather(1, best)[:, 0] > 0)  # 0: one level
    return threshold.float(), gap.float()


def _own_nucleus(nucleus: Tensor, join: int) -> Tensor:
    """The central cell's nucleus: the component nearest the image centre and the components within
    ``join`` pixels of it (twice over: the lobes of a segmented nucleus), not a touching cell's."""
    labels, bound = _label_components(nucleus)
    height, width = nucleus.shape[-2:]
    y, x = torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2
    distance = (y[:, None] ** 2 + x[None, :] ** 2).flatten().expand(len(nucleus), -1)
    nearest = torch.full((len(nucleus), bound), math.inf).scatter_reduce_(1, labels, distance, reduce="amin")
    nearest[:, 0] = math.inf
    own = (labels == nearest.argmin(1, keepdim=True)) & (labels > 0)
    for _ in range(2):
        near = _dilate(own.float().reshape(nucleus.shape), join).flatten(1) > 0
        hit = torch.zeros(len(nucleus), bound).scatter_add_(1, labels, near.float()) > 0
        hit[:, 0] = False
        own = hit.gather(1, labels)
    return own.float().reshape(nucleus.shape)


def _components_at_least(mask: Tensor, min_pixels: Tensor) -> Tensor:
    """The 8-connected components of (N, 1, H, W) masks with at least ``min_pixels`` (N,) pixels."""
    labels, bound = _label_components(mask)
    sizes = torch.zeros(len(mask), bound).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    return ((sizes.gather(1, labels) >= min_pixels[:, None]) & (labels > 0)).float().reshape(mask.shape)


def _grow_apart(cell: Tensor, own: Tensor, other: Tensor, steps: int) -> Tensor:
    """Split touching cells: grow the own and the other nuclei through the cell mask together (a
    geodesic Voronoi split); the pixels the own nucleus reaches first (or at the same step) stay."""
    split = (other * cell * (1 - own)).flatten(1).any(1)  # only cells that touch another one
    if not split.any():
        return cell
    cell_s, own_s = cell[split], own[split] * cell[split]
    other_s = other[split] * cell_s * (1 - own_s)
    for _ in range(steps):
        free = cell_s * (1 - own_s) * (1 - other_s)
        grown_own, grown_other = _dilate(own_s, 1) * free, _dilate(other_s, 1) * free
        if not (grown_own.any() or grown_other.any()):
            break
        own_s, other_s = own_s + grown_own, other_s + grown_other * (1 - grown_own)
    out = cell.clone()
    out[split] = own_s
    return out


def _segment_chunk(images: Tensor, cell_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Cell mask, nucleus mask (N, 1, H, W) {0, 1} and found (N,) of one chunk of uint8 images."""
    height, width = images.shape[-2:]
    side, pixels = min(height, width), height * width
    one, two = _radius(1, side), _radius(2, side)
    # The nucleus: nucleus_mask's steps without its final dilation, only small holes filled (a band
    # nucleus keeps its ring); the other stained components mark touching cells and platelets.
    score = hematoxylin_score(images.float() / 127.5 - 1)
    threshold = _otsu_threshold(score).clamp_min(NUCLEUS_MIN_SCORE)
    stain = _stain(score, threshold, one)
    # A stained (blue) cytoplasm, as in erythroblasts, passes that threshold with the nucleus: where
    # what passed splits into two clearly different stain levels, keep the darker.
    inner, gap = _masked_otsu(score, _select_components(stain, 0.2, 0.25)[0])
    stain = torch.where((gap >= SPLIT_GAP).view(-1, 1, 1, 1), _stain(score, torch.maximum(threshold, inner), one), stain)
    nucleus, largest = _select_components(stain, keep_fraction=0.2, centre_distance=0.25)
    nucleus = _fill_small_holes(_own_nucleus(nucleus, _radius(JOIN_RADIUS, side)), 0.001 * pixels)
    found = (largest >= MIN_NUCLEUS_AREA * pixels) & (nucleus.flatten(1).sum(1) <= MAX_NUCLEUS_AREA * pixels)
    others = _components_at_least(stain * (1 - nucleus), (0.1 * largest).clamp_min(MIN_NUCLEUS_AREA * pixels))  # neighbours: nuclei, platelets
    # The cell: purpler than the red cells (a 3 x 3 mean at 64 px), opened (drops red-cell rims),
    # the component on the nucleus, closed and filled, opened harder (cuts attachments), split
    # from touching cells and platelets that have a stain of their own, filled again.
    window = 2 * round(side / REFERENCE_SIDE) + 1
    purple = F.avg_pool2d(lab_purple(images), window, 1, window // 2, count_include_pad=False)
    # Smears stained bluer make the red cells purpler too: the threshold stays CELL_MARGIN above the
    # red cells' level, the 90th percentile far from the centre (red cells and background there).
    y, x = torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2
    far = (y[:, None] ** 2 + x[None, :] ** 2).flatten() > (0.4 * side) ** 2
    red_level = torch.quantile(purple.flatten(1)[:, far], 0.9, dim=1)
    threshold = (red_level + CELL_MARGIN).clamp_min(cell_threshold).view(-1, 1, 1, 1)
    cell = ((purple > threshold).float() + nucleus).clamp(max=1)
    cell = _largest_overlap((_dilate(_erode(cell, one), one) + nucleus).clamp(max=1), nucleus)
    cell = _fill_holes(_erode(_dilate(cell, one), one))
    cell = _largest_overlap((_dilate(_erode(cell, two), two) + nucleus).clamp(max=1), nucleus)
    cell = _fill_holes(_largest_overlap(_grow_apart(cell, nucleus, others, side), nucleus))
    found &= (cell.flatten(1).sum(1) <= MAX_CELL_AREA * pixels) & (cell.flatten(1).sum(1) > 0)
    return cell, nucleus * cell, found


def _segment(images: Tensor | np.ndarray, cell_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    x = _as_nchw_uint8(images).cpu()
    parts = [_segment_chunk(x[i : i + _CHUNK], cell_threshold) for i in range(0, len(x), _CHUNK)]
    if not parts:
        empty = torch.zeros(0, 1, *x.shape[-2:])
        return empty, empty, torch.zeros(0, dtype=torch.bool)
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def segment(images: Tensor | np.ndarray, cell_threshold: float = CELL_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Segment the white cell and its nucleus in each image (docs/morphology.md).

    Args:
        images: uint8 (N, 3, H, W) or (N, H, W, 3), numpy or torch, cells centred (as in PBC).
        cell_threshold: CIELAB a* - b* above which a pixel counts as white cell (raised to
            ``CELL_MARGIN`` above the red cells' level where the smear is stained bluer).

    Returns:
        ``(cell_mask, nucleus_mask)``, bool (N, H, W) each; the nucleus lies inside the cell. Both
        are empty where the segmentation failed (no nucleus found, or a cell covering the image).
    """
    cell, nucleus, found = _segment(images, cell_threshold)
    keep = found.view(-1, 1, 1, 1)
    return (cell * keep)[:, 0].bool().numpy(), (nucleus * keep)[:, 0].bool().numpy()


def _convex_pixels(mask: np.ndarray) -> int:
    """Pixels of the digital convex hull: pixel centres in the convex hull of the mask's pixel centres
    (boundary included), so a digitised disc or square is its own hull (solidity 1) and a lone pixel too."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return 0
    left, right = mask[rows].argmax(1), mask.shape[1] - 1 - mask[rows, ::-1].argmax(1)
    points = sorted({(float(y), float(x)) for y, lo, hi in zip(rows, left, right, strict=True) for x in (lo, hi)})

    def half(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:  # Andrew's monotone chain
        chain: list[tuple[float, float]] = []
        for p in sequence:
            while len(chain) >= 2 and (chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1]) <= (
                chain[-1][1] - chain[-2][1]
            ) * (p[0] - chain[-2][0]):
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(points) + half(points[::-1]) or points)
    start, end = hull, np.roll(hull, -1, axis=0)
    ys = np.arange(rows[0], rows[-1] + 1, dtype=np.float64)[:, None]  # every pixel row the hull spans
    crosses = (np.minimum(start[:, 0], end[:, 0]) <= ys) & (ys <= np.maximum(start[:, 0], end[:, 0]))
    crosses &= start[:, 0] != end[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = start[:, 1] + (ys - start[:, 0]) * (end[:, 1] - start[:, 1]) / (end[:, 0] - start[:, 0])
    low, high = np.where(crosses, xs, np.inf).min(1), np.where(crosses, xs, -np.inf).max(1)
    low[rows - rows[0]], high[rows - rows[0]] = np.minimum(low[rows - rows[0]], left), np.maximum(high[rows - rows[0]], right)
    return int(np.maximum(np.floor(high + 1e-9) - np.ceil(low - 1e-9) + 1, 0).sum())


def morphology_features(
    images: Tensor | np.ndarray, cell_threshold: float = CELL_THRESHOLD, min_cytoplasm: float = 0.002
) -> dict[str, np.ndarray]:
    """Per-cell morphology (``FEATURES``, float64 (N,) each) and ``failed`` (bool (N,)).

    Areas are fractions of the image and ``cell_diameter`` (equivalent-circle) a fraction of the side,
    so real and generated cells compare at any resolution; ``nc_ratio`` = nucleus / cell area;
    ``nucleus_solidity`` = area / digital convex-hull area (1 for a disc); ``nucleus_lobes`` = components
    of the nucleus eroded by ``LOBE_EROSION`` px (at 64 px) holding at least ``LOBE_FRACTION`` of it;
    colours are mean 0-255 values over the nucleus and over the rest of the cell (NaN when that is
    under ``min_cytoplasm`` of the image: basophils, platelets). A failed segmentation gives NaN in
    every feature.

    Args:
        images: uint8 (N, 3, H, W) or (N, H, W, 3), numpy or torch.
        cell_threshold: See ``segment``.
        min_cytoplasm: Smallest cytoplasm, as a fraction of the image, that gets a colour.
    """
    x = _as_nchw_uint8(images).cpu()
    if not len(x):
        return {**{name: np.zeros(0) for name in FEATURES}, "failed": np.zeros(0, dtype=bool)}
    cell, nucleus, found = _segment(x, cell_threshold)
    count, (height, width) = len(x), x.shape[-2:]
    pixels = float(height * width)
    cell_px, nucleus_px = cell.flatten(1).sum(1).double(), nucleus.flatten(1).sum(1).double()
    cytoplasm = cell * (1 - nucleus)
    cytoplasm_px = cytoplasm.flatten(1).sum(1).double()
    rgb = x.double()

    def mean_colour(mask: Tensor, size: Tensor) -> Tensor:
        return (rgb * mask.double()).flatten(2).sum(2) / size.clamp_min(1)[:, None]

    eroded = _erode(nucleus, _radius(LOBE_EROSION, min(height, width)))
    labels, bound = _label_components(eroded)
    sizes = torch.zeros(count, bound).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    sizes[:, 0] = 0
    lobes = (sizes >= LOBE_FRACTION * sizes.sum(1, keepdim=True)).logical_and(sizes > 0).sum(1).clamp_min(1)
    masks = nucleus[:, 0].bool().numpy()
    convex = np.array([_convex_pixels(masks[i]) if found[i] else 0 for i in range(count)], dtype=np.float64)
    nucleus_rgb, cytoplasm_rgb = mean_colour(nucleus, nucleus_px), mean_colour(cytoplasm, cytoplasm_px)
    cytoplasm_rgb[cytoplasm_px < max(min_cytoplasm * pixels, 1)] = math.nan
    feats = {
        "nucleus_area": (nucleus_px / pixels).numpy(),
        "cell_area": (cell_px / pixels).numpy(),
        "nc_ratio": (nucleus_px / cell_px.clamp_min(1)).numpy(),
        "nucleus_solidity": nucleus_px.numpy() / np.maximum(convex, 1),
        "nucleus_lobes": lobes.double().numpy(),
        "cell_diameter": (2 * torch.sqrt(cell_px / math.pi) / math.sqrt(pixels)).numpy(),
    }
    for c, channel in enumerate(("red", "green", "blue")):
        feats[f"nucleus_{channel}"], feats[f"cytoplasm_{channel}"] = nucleus_rgb[:, c].numpy(), cytoplasm_rgb[:, c].numpy()
    failed = ~found.numpy()
    out = {name: np.where(failed, np.nan, feats[name]).astype(np.float64) for name in FEATURES}
    out["failed"] = failed
    return out


def wasserstein_1d(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Wasserstein-1 distance between two 1-D samples of any sizes (NaNs dropped; NaN if either is empty).

    W1 = integral of |F_a(x) - F_b(x)| dx over the empirical CDFs: exact, piecewise constant between
    the pooled sorted values.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    if not a.size or not b.size:
        return math.nan
    pooled = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, pooled[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, pooled[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(pooled)))


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _floor(real: np.ndarray, stand_in: np.ndarray | None, size: int, rng: np.random.Generator, draws: int) -> tuple[float, int]:
    """Mean W1 of ``size`` real cells in place of the generated ones, and the size used.

    With ``stand_in`` (other real cells, e.g. the training split's), ``size`` of them against all of
    ``real``; without, ``size`` (at most half) of ``real`` against the rest of ``real``.
    """
    if stand_in is not None:
        size = min(size, len(stand_in))
        if size == 0:
            return math.nan, 0
        picks = [stand_in] if size == len(stand_in) else [rng.choice(stand_in, size, replace=False) for _ in range(draws)]
        return float(np.mean([wasserstein_1d(p, real) for p in picks])), size
    size = min(size, len(real) // 2)
    if size == 0:
        return math.nan, 0
    values = []
    for _ in range(draws):
        order = rng.permutation(len(real))
        values.append(wasserstein_1d(real[order[:size]], real[order[size:]]))
    return float(np.mean(values)), size


def morphology_distances(
    real_feats: Mapping[str, np.ndarray],
    real_labels: np.ndarray | Sequence[int],
    fake_feats: Mapping[str, np.ndarray],
    fake_labels: np.ndarray | Sequence[int],
    class_names: Sequence[str],
    floor_feats: Mapping[str, np.ndarray] | None = None,
    floor_labels: np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
    draws: int = 10,
) -> list[dict[str, Any]]:
    """Per class and feature: W1(real, generated) / the real cells' standard deviation, and its floor.

    ``floor`` is the same normalised distance with real cells in place of the generated ones, at the
    generated set's size (mean over ``draws`` random draws): ``floor_feats`` cells of the class (e.g. the
    training split's) against the real ones, or without them half of the real cells against the other half
    (at most). A generator that matches the real cells scores about the floor, not 0. The scale is the
    class's real standard deviation (ddof 0), or the feature's over all real cells when that is 0.

    Args:
        real_feats, fake_feats, floor_feats: ``morphology_features`` dicts.
        real_labels, fake_labels, floor_labels: (N,) class indices into ``class_names``.
        class_names: The classes, in index order.
        seed: Seed of the floor's draws.
        draws: Random draws the floor averages over.

    Returns:
        One dict per (class, feature): ``class``, ``feature``, ``n_real``, ``n_generated`` (finite values),
        ``w1``, ``scale``, ``normalised_w1``, ``floor``, ``floor_n``, ``real_median``, ``generated_median``.
    """
    rng = np.random.default_rng(seed)
    real_labels, fake_labels = np.asarray(real_labels), np.asarray(fake_labels)
    rows = []
    for c, name in enumerate(class_names):
        for feature in FEATURES:
            real = _finite(np.asarray(real_feats[feature])[real_labels == c])
            fake = _finite(np.asarray(fake_feats[feature])[fake_labels == c])
            row: dict[str, Any] = {"class": name, "feature": feature, "n_real": len(real), "n_generated": len(fake)}
            if len(real) >= 2 and len(fake) >= 1:
                scale = float(real.std()) or float(np.nanstd(np.asarray(real_feats[feature], dtype=np.float64)))
                stand_in = None
                if floor_feats is not None:
                    stand_in = _finite(np.asarray(floor_feats[feature])[np.asarray(floor_labels) == c])
                floor, floor_n = _floor(real, stand_in, len(fake), rng, draws)
                w1 = wasserstein_1d(real, fake)
                row.update(w1=w1, scale=scale, normalised_w1=w1 / scale if scale else math.nan,
                           floor=floor / scale if scale else math.nan, floor_n=floor_n,
                           real_median=float(np.median(real)), generated_median=float(np.median(fake)))  # fmt: skip
            rows.append(row)
    return rows


def failure_summary(
    real_feats: Mapping[str, np.ndarray], real_labels: np.ndarray | Sequence[int], fake_feats: Mapping[str, np.ndarray],
    fake_labels: np.ndarray | Sequence[int], class_names: Sequence[str], rows: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:  # fmt: skip
    """Per class: cells, the fraction whose segmentation failed (real, generated), mean normalised W1 and floor."""
    out = []
    for c, name in enumerate(class_names):
        real, fake = np.asarray(real_feats["failed"])[np.asarray(real_labels) == c], np.asarray(fake_feats["failed"])[np.asarray(fake_labels) == c]
        mine = [r for r in rows if r["class"] == name and "normalised_w1" in r]
        out.append({"class": name, "n_real": len(real), "n_generated": len(fake),
                    "failed_real": float(real.mean()) if len(real) else math.nan,
                    "failed_generated": float(fake.mean()) if len(fake) else math.nan,
                    "mean_normalised_w1": float(np.nanmean([r["normalised_w1"] for r in mine])) if mine else math.nan,
                    "mean_floor": float(np.nanmean([r["floor"] for r in mine])) if mine else math.nan})  # fmt: skip
    return out
