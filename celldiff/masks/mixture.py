"""The one registry of mask families, and ``MaskSampler``: a weighted mixture of them.

Adding a mask family: write its function (in ``celldiff.masks.shapes``, or a module of its own) and
add one line to ``FAMILIES``. Every list of mask names (``MASK_TYPES``, the default weights, the
names the data module and the CLI accept, the families an evaluation reports) is read from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from celldiff.masks.nucleus import nucleus_mask
from celldiff.masks.shapes import box_mask, brush_mask, centre_mask, check_mask, full_mask, half_mask, outpaint_mask

MaskSpec = str | Sequence[str] | Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Family:
    """A mask family of the registry.

    Attributes:
        make: ``make(size, generator, **options)`` -> (1, size, size) float32 {0, 1}; with
            ``reads_image``, ``make(image, generator, **options)`` for an image (3, S, S) or a batch
            (B, 3, S, S) in [-1, 1] in one pass, -> (1, S, S) or (B, 1, S, S), and
            ``make(images, None, **options, return_found=True)`` -> (masks, found (B,) bool): the
            mask of an item with ``found`` False came from the generator (a fallback), the others
            from the image alone.
        weight: Default weight in the mixture (``MaskSampler()``).
        reads_image: Whether ``make`` reads the image rather than only its side.
    """

    make: Callable[..., Any]
    weight: float = 1.0
    reads_image: bool = False


FAMILIES: dict[str, Family] = {
    "box": Family(box_mask, 1.0),
    "brush": Family(brush_mask, 1.0),
    "centre": Family(centre_mask, 0.5),
    "half": Family(half_mask, 0.5),
    "outpaint": Family(outpaint_mask, 0.5),
    "nucleus": Family(nucleus_mask, 1.0, reads_image=True),
    # Off by default (weight 0): with it in the training mixture one inpainting model also generates
    # from scratch (an all-ones mask is "nothing observed").
    "full": Family(full_mask, 0.0),
}
MASK_TYPES: tuple[str, ...] = tuple(FAMILIES)
DEFAULT_MASK_WEIGHTS: dict[str, float] = {name: family.weight for name, family in FAMILIES.items()}


def check_names(names: Sequence[str]) -> None:
    """Raise ValueError naming the valid families unless every name is in the registry."""
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown mask type(s) {unknown}; valid mask types are {list(FAMILIES)}")


def spec_weights(spec: MaskSpec) -> dict[str, float]:
    """Weights of ``"nucleus"``, ``"box,brush"`` / ``["box", "brush"]`` (equal weights) or a weight dict."""
    if isinstance(spec, str):
        return dict.fromkeys((part.strip() for part in spec.split(",") if part.strip()), 1.0)
    if isinstance(spec, Mapping):
        return dict(spec)
    return dict.fromkeys(spec, 1.0)


def mask_families(spec: MaskSpec) -> list[str]:
    """The families a spec draws from (positive weight), in registry order: one evaluation each.

    Raises:
        ValueError: an unknown family or a bad weight.
    """
    names = MaskSampler.from_spec(spec).names
    return [name for name in FAMILIES if name in names]


def _check_image(image: Tensor, ndim: int) -> None:
    if image.ndim != ndim or image.shape[-3] != 3 or image.shape[-1] != image.shape[-2]:
        expected = "(3, H, H)" if ndim == 3 else "(B, 3, H, H)"
        raise ValueError(f"expected a square image batch of shape {expected}, got {tuple(image.shape)}")


class MaskSampler:
    """A weighted mixture of mask families, drawn once per image.

    Example: ``MaskSampler({"box": 1, "brush": 1, "nucleus": 2}, options={"box": {"num_boxes": (1, 5)}})``;
    ``MaskSampler.from_spec("nucleus")`` for a single family.

    Args:
        mask_types: Weight per family (any of ``MASK_TYPES``); weights are relative, >= 0, and a
            zero weight disables a family. Default: ``DEFAULT_MASK_WEIGHTS``.
        options: Keyword arguments per family, passed to its function (e.g. ``{"nucleus": {"dilate": 3}}``).

    Raises:
        ValueError: an unknown family or option, or weights that are negative, not finite or all zero.
    """

    def __init__(
        self,
        mask_types: Mapping[str, float] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        weights = dict(DEFAULT_MASK_WEIGHTS if mask_types is None else mask_types)
        options = dict(options or {})
        check_names(list(weights) + list(options))
        if not weights or any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mask_types weights must be finite, >= 0 and not all zero, got {weights}")
        for name, kwargs in options.items():
            parameters = list(inspect.signature(FAMILIES[name].make).parameters)[2:]  # after (size|image, generator)
            bad = [key for key in kwargs if key not in parameters or key == "return_found"]
            if bad:
                raise ValueError(f"unknown option(s) {bad} for mask type {name!r}; valid: {parameters}")
        self.names: tuple[str, ...] = tuple(name for name, weight in weights.items() if weight > 0)
        total = sum(weights[name] for name in self.names)
        self.probabilities: dict[str, float] = {name: weights[name] / total for name in self.names}
        self.options: dict[str, dict[str, Any]] = {name: dict(kwargs) for name, kwargs in options.items()}
        self._probs = torch.tensor([self.probabilities[name] for name in self.names], dtype=torch.float64)

    @classmethod
    def from_spec(cls, spec: MaskSpec, options: Mapping[str, Mapping[str, Any]] | None = None) -> MaskSampler:
        """Build from ``"nucleus"``, ``"box,brush"`` / ``["box", "brush"]`` (equal weights) or a weight dict."""
        return cls(spec_weights(spec), options)

    def __repr__(self) -> str:
        probabilities = ", ".join(f"{name}: {p:.3f}" for name, p in self.probabilities.items())
        return f"MaskSampler({{{probabilities}}}, options={self.options})"

    def check(self, size: int = 32) -> None:
        """Draw one trial mask per family, with its options, and check it against the conventions.

        Raises:
            ValueError, TypeError, KeyError, IndexError: an option value the family rejects, or a
                family whose mask is not a float32 (1, S, S) {0, 1} mask.
        """
        probe = torch.zeros(3, size, size)
        for name in self.names:
            check_mask(self.make(name, probe, torch.Generator().manual_seed(0)), probe)

    def choose(self, generator: torch.Generator, count: int | None = None) -> str | list[str]:
        """Draw family name(s) according to the weights (one name, or a list of ``count``)."""
        indices = torch.multinomial(self._probs, 1 if count is None else count, replacement=True, generator=generator)
        names = [self.names[i] for i in indices.tolist()]
        return names[0] if count is None else names

    def make(self, name: str, image: Tensor, generator: torch.Generator) -> Tensor:
        """The mask (1, H, W) of family ``name`` for ``image`` (3, H, W), with this sampler's options."""
        check_names([name])
        family = FAMILIES[name]
        source = image if family.reads_image else image.shape[-1]
        return family.make(source, generator, **self.options.get(name, {})).to(image.device)

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """A mask (1, H, W) float32 for one image (3, H, W) in [-1, 1]: the family is drawn first, then its mask."""
        _check_image(image, 3)
        return self.make(self.choose(generator), image, generator)

    def batch(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Masks (B, 1, H, W) float32 for images (B, 3, H, W), image-reading families in one batched pass.

        Draws all B families first, then the masks (each image-reading family's items together, then
        the others in order), so it consumes the generator differently from B calls of ``__call__``
        (both are deterministic).
        """
        _check_image(images, 4)
        return self._masks(images, self.choose(generator, images.shape[0]), [generator] * images.shape[0], True)

    def per_item(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        """Masks (B, 1, H, W) float32: item i's exactly ``self(images[i], generators[i])``.

        Image-reading families still run in one batched pass; only their fallbacks (items without a
        found mask) are redrawn from the item's own generator.
        """
        _check_image(images, 4)
        return self._masks(images, [self.choose(g) for g in generators], list(generators), False)

    def _masks(self, images: Tensor, names: list[str], generators: list[torch.Generator], shared: bool) -> Tensor:
        """The masks of ``names`` (one per image); ``shared``: all ``generators`` are one generator."""
        masks = torch.empty(len(names), 1, *images.shape[-2:], device=images.device)
        for name, family in FAMILIES.items():
            rows = [i for i, drawn in enumerate(names) if drawn == name]
            if not family.reads_image or not rows:
                continue
            options = self.options.get(name, {})
            if shared:  # fallbacks draw from the one generator, in row order
                masks[rows] = family.make(images[rows], generators[0], **options).to(images.device)
                continue
            found_masks, found = family.make(images[rows], None, **options, return_found=True)
            masks[rows] = found_masks.to(images.device)
            for j, i in enumerate(rows):
                if not bool(found[j]):  # the fallback draws from the item's own generator
                    masks[i] = self.make(name, images[i], generators[i])
        for i, name in enumerate(names):
            if not FAMILIES[name].reads_image:
                masks[i] = self.make(name, images[i], generators[i])
        return masks
