"""Non-learned inpainting baselines, measured by ``celldiff evaluate --baseline NAME`` like a model.

A learned inpainter has to beat these on the masked-region metrics to be worth its compute:

- ``mean_fill``: every missing pixel takes the mean colour of the known pixels in a 2-pixel ring
  around the hole (all known pixels when the hole has no known neighbour).
- ``blur_fill``: the hole is filled by repeated normalised 3 × 3 averaging of the known pixels
  (a cheap harmonic / diffusion fill: smooth, continuous at the boundary, no texture).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_fill(image: Tensor, mask: Tensor) -> Tensor:
    """Fill ``mask == 1`` pixels of ``image`` (B, C, H, W) with the mean colour of the known ring."""
    ring = F.max_pool2d(mask, 5, stride=1, padding=2) - mask  # known pixels within 2 px of the hole
    ring = torch.where(ring.sum((2, 3), keepdim=True) > 0, ring, 1 - mask)
    colour = (image * ring).sum((2, 3), keepdim=True) / ring.sum((2, 3), keepdim=True).clamp_min(1)
    return torch.where(mask > 0, colour.expand_as(image), image)


def blur_fill(image: Tensor, mask: Tensor, iterations: int | None = None) -> Tensor:
    """Fill the hole by propagating known colours inwards with normalised 3 × 3 averaging.

    Each iteration replaces every missing pixel by the mean of its already-filled neighbours; known
    pixels never change. ``iterations`` defaults to the image side (enough to reach every pixel),
    then the fill keeps smoothing so it approximates the harmonic (Laplace) interpolation.
    """
    iterations = iterations if iterations is not None else 2 * max(image.shape[-2:])
    known = 1 - mask
    filled = image * known
    weight = known.clone()
    kernel = torch.ones(1, 1, 3, 3, dtype=image.dtype, device=image.device)
    channels = image.shape[1]
    for _ in range(iterations):
        num = F.conv2d(F.pad(filled * weight, (1, 1, 1, 1), mode="replicate"), kernel.expand(channels, 1, 3, 3), groups=channels)
        den = F.conv2d(F.pad(weight, (1, 1, 1, 1), mode="replicate"), kernel)
        update = num / den.clamp_min(1e-8)
        reached = (den > 0).to(image.dtype)
        filled = torch.where(known > 0, image, torch.where(reached > 0, update, filled))
        weight = torch.maximum(known, reached)
    return filled


BASELINES = {"mean_fill": mean_fill, "blur_fill": blur_fill}


class FillBaseline:
    """A non-learned fill dressed as a model for ``celldiff.evaluation.run.generate_for_evaluation``."""

    def __init__(self, name: str, image_size: int) -> None:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
        self.name, self.fill = name, BASELINES[name]
        self.device = torch.device("cpu")
        self.hparams = SimpleNamespace(
            inpainting=True, class_conditional=False, image_size=image_size, sampler=name, sampling_steps=0
        )

    def network_condition(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """The known image (B, 3, S, S) in [-1, 1] and the mask (B, 1, S, S), 1 = missing, of a batch."""
        if "mask" not in batch:
            raise KeyError(f"the {self.name} baseline inpaints: set data.eval_masks (e.g. --data.eval_masks box)")
        return {"known": batch["image"], "mask": batch["mask"]}

    def generate(self, noise_seeds: Sequence[int], condition: dict[str, Any], **_: Any) -> Tensor:
        """The filled images (B, 3, S, S) in [-1, 1]; the noise seeds and sampler options are unused."""
        return self.fill(condition["known"], condition["mask"]).clamp(-1, 1)

    def to(self, device: torch.device | str) -> FillBaseline:
        self.device = torch.device(device)
        return self

    def eval(self) -> FillBaseline:
        return self
