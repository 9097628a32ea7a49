"""Metrics on ImageNet networks, offline: LPIPS (AlexNet) and Inception FID/KID from local weights only.

Each runs only when its weights file is on disk (a path given, or torch hub's cache file) and
otherwise returns ``(None, reason)``: nothing here downloads anything. Images are (N, 3, H, W).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torch-fidelity's Inception weights (the TF-FID port) as torch.hub caches them.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

# ----------------------------------------------------------------------------------- LPIPS

ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, as LPIPS uses


def default_lpips_weights() -> Path:
    """Where torchvision caches its AlexNet weights: the torch hub dir."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILE


def lpips_network(weights_path: str | os.PathLike[str] | None) -> tuple[nn.Module | None, str | None]:
    """LPIPS (Zhang et al. 2018, AlexNet variant) built offline, or (None, reason) when it cannot be.

    The linear calibration layers ship inside torchmetrics; the AlexNet backbone comes from
    ``weights_path`` (torchvision's ``alexnet-owt-7be5be79.pth`` state dict) or, without one, from the
    torch hub cache if the file is there. Never downloads.
    """
    path = Path(weights_path).expanduser() if weights_path else default_lpips_weights()
    if not path.is_file():
        where = f"weights file {path} does not exist" if weights_path else f"no weights path given and none at {path}"
        return None, f"LPIPS skipped: {where} (torchvision's AlexNet ImageNet weights; celldiff never downloads them)"
    try:
        from torchmetrics.functional.image.lpips import _LPIPS
    except ImportError as err:  # the private class moved in another torchmetrics release
        return None, f"LPIPS skipped: this torchmetrics has no LPIPS network ({err})"
    import torchvision

    backbone = torchvision.models.alexnet(weights=None)
    try:
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        return None, f"LPIPS skipped: {path} is not torchvision AlexNet weights ({err.__class__.__name__})"
    net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # calibrated linear layers, backbone below
    for part in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
        for name, module in part.named_children():
            module.load_state_dict(backbone.features[int(name)].state_dict())
    return net.eval().requires_grad_(False), None


@torch.no_grad()
def lpips_distances(net: nn.Module, a: Tensor, b: Tensor, batch_size: int = 64, min_size: int = 64) -> Tensor:
    """Per-image LPIPS between ``a`` and ``b`` (N, 3, H, W) in [-1, 1]; lower = perceptually closer.

    Images smaller than ``min_size`` are upsampled (bilinear) first: AlexNet's stride-4 stem and
    pooling leave almost nothing of a 32 px cell otherwise.
    """
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(a), batch_size):
        x, y = a[i : i + batch_size].to(device).float(), b[i : i + batch_size].to(device).float()
        if x.shape[-1] < min_size:
            x = F.interpolate(x, size=min_size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=min_size, mode="bilinear", align_corners=False)
        out.append(net(x.clamp(-1, 1), y.clamp(-1, 1)).flatten().cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------- Inception


def default_inception_weights() -> Path:
    """Where torch-fidelity (and so torchmetrics) caches its Inception weights: the torch hub dir."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_metrics(
    real_uint8: Tensor,
    fake_uint8: Tensor,
    weights_path: str | os.PathLike[str] | None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> tuple[dict[str, float] | None, str | None]:
    """Inception FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) through torchmetrics, offline.

    Runs only with the weights on disk: ``weights_path``, or else torch-fidelity's cache file
    ``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth`` if it exists. The path is
    handed to torchmetrics' ``FrechetInceptionDistance(feature_extractor_weights_path=...)``, with
    which torch-fidelity loads the file instead of downloading; KID reuses that network (its own
    constructor takes no weights path). Never downloads.

    Args:
        real_uint8, fake_uint8: Images (N, 3, H, W) uint8 (resized to 299 inside the network).
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, or None.

    Returns:
        (metrics, None) with ``inception_fid``, ``inception_kid_mean``, ``inception_kid_std`` and
        counts, or (None, reason) when skipped (no weights file, torch-fidelity not installed).
    """
    path = Path(weights_path).expanduser() if weights_path else default_inception_weights()
    if not path.is_file():
        where = f"weights file {path} does not exist" if weights_path else f"no weights path given and none at {path}"
        return None, f"Inception FID/KID skipped: {where} (celldiff never downloads them)"
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        return None, "Inception FID/KID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = torch.as_tensor(real_uint8), torch.as_tensor(fake_uint8)
    if real.dtype != torch.uint8 or fake.dtype != torch.uint8:
        raise ValueError("inception_metrics expects uint8 images (N, 3, H, W)")
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path)).to(device)
    subset = min(1000, len(real), len(fake))
    kid = KernelInceptionDistance(feature=fid.inception, subsets=100, subset_size=subset).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size].to(device)
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {
        "inception_fid": float(fid.compute()),
        "inception_kid_mean": float(kid_mean),
        "inception_kid_std": float(kid_std),
        "num_real": len(real),
        "num_generated": len(fake),
        "kid_subset_size": subset,
    }, None
