"""Masked-region metrics for inpainting: error, PSNR and SSIM inside the mask, and a seam score.

All functions take images in [-1, 1], (B, C, H, W), and masks (B, 1, H, W) with 1 = missing, and
return one value per image (B,) so callers can average by mask family. SSIM comes from
torchmetrics (its full SSIM map, averaged inside the mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean of (B, C, H, W) values over the pixels where mask (B, 1, H, W) is 1."""
    weight = mask.expand_as(values).float()
    return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error inside the mask, on the [0, 1] intensity scale. Returns (B,)."""
    return _masked_mean(((pred.float() - target.float()) / 2) ** 2, mask)


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """PSNR (dB) inside the mask, for intensities in [0, 1] (data range 1). Returns (B,)."""
    return -10 * torch.log10(masked_mse(pred, target, mask).clamp_min(1e-10))


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor, kernel_size: int = 7) -> Tensor:
    """SSIM (Wang et al. 2004) averaged over the pixels inside the mask. Returns (B,).

    torchmetrics computes the full SSIM map (Gaussian window, data range 1); a small window suits
    64 x 64 cells.
    """
    _, ssim_map = structural_similarity_index_measure(
        (pred.float() + 1) / 2,
        (target.float() + 1) / 2,
        data_range=1.0,
        kernel_size=kernel_size,
        sigma=1.5 * kernel_size / 11,
        reduction="none",
        return_full_image=True,
    )
    return _masked_mean(ssim_map, mask)


def _gradient_magnitude(x: Tensor) -> Tensor:
    """Per-pixel gradient magnitude (B, 1, H, W) of the channel mean, by central differences."""
    grey = x.float().mean(1, keepdim=True)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return torch.sqrt(dx**2 + dy**2)


def boundary_ring(mask: Tensor, width: int = 1) -> Tensor:
    """Pixels within ``width`` of the mask boundary, on both sides. Returns (B, 1, H, W) {0, 1}."""
    m = mask.float()
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return dilated - eroded


def seam_score(pred: Tensor, target: Tensor, mask: Tensor, width: int = 1) -> Tensor:
    """Gradient mismatch along the mask boundary: mean |grad(pred)| - |grad(target)| on the ring.

    A visible seam (a step between generated and known pixels) adds gradient where the real image
    has none; 0 means the boundary is as smooth (or as sharp) as in the real image. Reported as the
    mean absolute difference of gradient magnitudes on the ring, on the [0, 1] intensity scale.
    Returns (B,).
    """
    ring = boundary_ring(mask, width)
    diff = (_gradient_magnitude(pred) - _gradient_magnitude(target)).abs() / 2
    return _masked_mean(diff, ring)


def inpainting_metrics(pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """All masked-region metrics, one value per image: mse, psnr, ssim, seam."""
    return {
        "mse": masked_mse(pred, target, mask),
        "psnr": masked_psnr(pred, target, mask),
        "ssim": masked_ssim(pred, target, mask),
        "seam": seam_score(pred, target, mask),
    }
