"""Judging generated cells: Fréchet distance, precision/recall, memorisation, classifier agreement.

Pure functions on tensors (features (N, D), images (N, 3, S, S) in [-1, 1] or uint8), with the
statistics in float64. The feature space is the project's own cell classifier
(``celldiff.classifier.CellClassifier.features``): it works offline and knows what a blood cell is.
Inception FID/KID (``inception_metrics``) run only when the Inception weights are on disk; nothing
here downloads anything.

Fréchet distances are biased upwards at small sample sizes (Chong & Forsyth 2020, "Effectively
Unbiased FID and Inception Score and where to find them"): compare figures only at equal n, and
against ``frechet_distance_floor`` (n real cells against the other real cells: the score's set sizes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torch-fidelity's Inception weights (the TF-FID port) as torch.hub caches them.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
SMALL_N_NOTE = (
    "Fréchet distances are biased upwards at small n (Chong & Forsyth 2020): compare them only at equal n, "
    "and against the real-vs-real floor at that n. The kernel distance (KID) is unbiased: its real-vs-real floor "
    "is 0 in expectation and shows the noise at this n."
)


# ----------------------------------------------------------------------------------- helpers


def _as_float64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu().flatten(1).double()


def _to_model_input(images: Tensor | np.ndarray) -> Tensor:
    """(B, 3, S, S) float in [-1, 1]; uint8 images (B, 3, S, S) are scaled from [0, 255]."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1.0)
    return images.float()


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def _gaussian(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a Gaussian, got {features.shape[0]}")
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


# ----------------------------------------------------------------------------------- Fréchet


def frechet_distance_gaussians(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    d² = ||μ_a − μ_b||² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a^½ Σ_b Σ_a^½)^½) (Dowson & Landau 1982; the FID
    of Heusel et al. 2017, eq. 6). tr((Σ_a Σ_b)^½) is computed as the trace of the square root of the
    symmetric PSD matrix Σ_a^½ Σ_b Σ_a^½ (same eigenvalues), in float64 with ``torch.linalg.eigh``:
    no scipy, and no complex parts from a non-symmetric ``sqrtm``.
    """
    mean_a, mean_b, cov_a, cov_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mean_a, mean_b, cov_a, cov_b))
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)  # rounding can leave a tiny negative value for equal Gaussians


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    With Inception pool features this is the FID of Heusel et al. 2017 ("GANs Trained by a Two
    Time-Scale Update Rule Converge to a Local Nash Equilibrium"); here it is usually computed on the
    cell classifier's features. Biased upwards at small n: report n with it.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_gaussians(*_gaussian(a), *_gaussian(b))


FLOOR_DRAWS = 8  # random draws the real-vs-real floor averages over


def frechet_floor_details(
    real_feats: Tensor | np.ndarray,
    n: int | None = None,
    generator: torch.Generator | None = None,
    draws: int = FLOOR_DRAWS,
    reference_n: int | None = None,
) -> dict[str, Any]:
    """The real-vs-real floor of a score "n generated vs all N real", measured at the score's set sizes.

    The Fréchet distance's finite-sample bias depends on both set sizes (about tr Σ (1/n + 1/N) from
    the means alone; Chong & Forsyth 2020), so a floor of n real against n real (bias ≈ 2/n) is far
    above what a perfect generator scores against all N (≈ 1/n + 1/N). Here ``n`` random real
    features stand in for a perfect generator's samples and are compared with the real features
    left over: a reference of N - n, not N. Its extra bias is removed the way Chong & Forsyth
    extrapolate FID: the bias is linear in 1 / (reference size), so the same n are also compared
    with half of the rest, and the line through the two points is read at the score's reference
    size N. The result is averaged over ``draws`` random draws (same expectation, less noise).

    A score against a smaller real set (inpainting: m completions against the N - m test cells that
    were not inpainted) gives its size as ``reference_n``; with n + reference_n = N the draws have
    exactly the score's sizes and need no extrapolation.

    Args:
        real_feats: Real features (N, D).
        n: Size of the stand-in sample (the score's n); ``None`` or more than N // 2 gives N // 2, so
            the rest is never smaller than the sample.
        generator: Seeded generator of the draws (reproducible floors).
        draws: Number of random draws averaged.
        reference_n: Size of the real set the score compares with (default: all N); at most N - 2.

    Returns:
        ``floor`` (extrapolated to a reference of ``reference_n``), ``floor_rest`` (n vs the N - n
        rest, no extrapolation: slightly higher when the score's reference is all N), ``n`` (actually
        used), ``reference_n``, ``rest_n`` (N - n), ``draws`` and ``method`` (a sentence for the report).
    """
    real = _as_float64(real_feats)
    total = real.shape[0]
    target = total if reference_n is None else int(reference_n)
    limit = max(total // 2, total - target)  # the rest is never smaller than the sample, nor than the score's
    n = limit if n is None else min(n, limit)
    if n < 2 or total - n < 2:
        raise ValueError(f"need at least 4 real feature vectors for a floor, got {total}")
    rest, part = total - n, (total - n) // 2
    extrapolate = rest != target and 2 <= part < rest
    plain, extrapolated = [], []
    for _ in range(max(1, draws)):
        order = torch.randperm(total, generator=generator)
        sample, others = real[order[:n]], real[order[n:]]
        d_rest = frechet_distance(sample, others)
        plain.append(d_rest)
        if extrapolate:
            d_part = frechet_distance(sample, others[:part])
            slope = (d_part - d_rest) / (1 / part - 1 / rest)  # d(b) ≈ d_∞ + slope / b
            extrapolated.append(d_rest + slope * (1 / target - 1 / rest))
        else:
            extrapolated.append(d_rest)
    floor = max(float(np.mean(extrapolated)), 0.0)
    method = (
        f"{n} real cells drawn at random against the other {rest} real cells, and against {part} of them, "
        f"extrapolated linearly in 1/(reference size) to the score's {target}; mean of {max(1, draws)} draws"
        if extrapolate
        else f"{n} real cells drawn at random against the other {rest} real cells; mean of {max(1, draws)} draws"
    )
    return {
        "floor": floor,
        "floor_rest": float(np.mean(plain)),
        "n": n,
        "reference_n": target,
        "rest_n": rest,
        "draws": max(1, draws),
        "method": method,
    }


def frechet_distance_floor(
    real_feats: Tensor | np.ndarray,
    n: int | None = None,
    generator: torch.Generator | None = None,
    draws: int = FLOOR_DRAWS,
) -> tuple[float, int]:
    """Real-vs-real floor of a score "n generated vs all N real features", at those set sizes.

    ``n`` random real features against the rest (see ``frechet_floor_details``, which also returns
    the set sizes and the method); compare a model's distance only with the floor at the same n
    and the same real set.

    Returns:
        (distance, n actually used: at most N // 2).
    """
    details = frechet_floor_details(real_feats, n, generator, draws)
    return details["floor"], details["n"]


def kernel_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Kernel distance: the unbiased squared MMD with the cubic polynomial kernel k(x, y) = (xᵀy / D + 1)³.

    With Inception features this is the KID of Bińkowski et al. 2018 ("Demystifying MMD GANs", eq. 2
    and section 4); here it is computed on the cell classifier's features. Unlike the Fréchet
    distance it is unbiased at any n (its expectation for two samples of one distribution is 0, so
    it can come out slightly negative), which makes small evaluations comparable across n. The
    sets may differ in size (N_a, D) and (N_b, D); float64 throughout.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m, n, dim = a.shape[0], b.shape[0], a.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"kernel distance needs at least 2 feature vectors per set, got {m} and {n}")

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.T / dim + 1) ** 3

    k_aa, k_bb = kernel(a, a), kernel(b, b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return float(within_a + within_b - 2 * kernel(a, b).mean())


def kernel_distance_floor(
    real_feats: Tensor | np.ndarray, n: int, generator: torch.Generator | None = None
) -> tuple[float, int]:
    """Real-vs-real kernel distance: ``n`` random real features against all the others.

    The same shape of comparison as a model's ``n`` samples against the real set; its expectation is
    0, so its size shows how far from 0 a perfect model's value could land at this n.

    Returns:
        (distance, n actually used: at most half of the real set).
    """
    real = _as_float64(real_feats)
    n = min(n, real.shape[0] // 2)
    if n < 2:
        raise ValueError(f"need at least 4 real feature vectors for a floor, got {real.shape[0]}")
    order = torch.randperm(real.shape[0], generator=generator)
    return kernel_distance(real[order[:n]], real[order[n:]]), n


# ----------------------------------------------------------------------------------- nearest neighbours


def _pairwise_distances(queries: Tensor, references: Tensor) -> Tensor:
    """Euclidean distances (Q, R) through the matrix-product form (fast, approximate near 0)."""
    return torch.cdist(queries, references, compute_mode="use_mm_for_euclid_dist")


def nearest_neighbours(
    queries: Tensor | np.ndarray, references: Tensor | np.ndarray, chunk: int = 1024, candidates: int = 4
) -> tuple[Tensor, Tensor]:
    """Nearest reference of each query by Euclidean distance, in pixel space or feature space.

    Inputs are flattened to (N, D) (images (N, 3, S, S) become pixel vectors). Candidates are found
    with a float32 matrix product in chunks of ``chunk`` queries; the distances of the best
    ``candidates`` are then recomputed exactly in float64, so an exact copy has distance 0.

    Returns:
        distances (Q,) float64 and indices (Q,) int64 into ``references``.
    """
    q = torch.as_tensor(queries).detach().cpu().flatten(1)
    r = torch.as_tensor(references).detach().cpu().flatten(1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references differ in dimension: {q.shape[1]} vs {r.shape[1]}")
    if r.shape[0] == 0:
        raise ValueError("nearest_neighbours needs at least one reference")
    q32, r32, r64 = q.float(), r.float(), r.double()
    k = min(candidates, r.shape[0])
    distances, indices = [], []
    for start in range(0, q.shape[0], chunk):
        block = q[start : start + chunk].double()
        approx = _pairwise_distances(q32[start : start + chunk], r32)
        cand = approx.topk(k, dim=1, largest=False).indices  # (B, k)
        exact = (block[:, None, :] - r64[cand]).square().sum(-1).sqrt()  # (B, k)
        best = exact.argmin(dim=1)
        distances.append(exact.gather(1, best[:, None])[:, 0])
        indices.append(cand.gather(1, best[:, None])[:, 0])
    if not distances:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(distances), torch.cat(indices)


def _kth_neighbour_radius(features: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of every point to its k-th nearest neighbour in its own set (itself excluded)."""
    radii = []
    for start in range(0, features.shape[0], chunk):
        d = _pairwise_distances(features[start : start + chunk], features)
        # The point itself is at distance ~0 and is the smallest: the k-th neighbour is the (k+1)-th.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside_manifold(points: Tensor, support: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each point lies in some ball B(support_j, radii_j). Returns (N,) bool."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = _pairwise_distances(points[start : start + chunk], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(
    real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019 (k-NN manifold estimate).

    Each set's manifold is the union of balls around its points whose radius is the distance to the
    point's k-th nearest neighbour in the same set. Precision is the fraction of generated samples
    inside the real manifold (fidelity); recall the fraction of real samples inside the generated
    manifold (coverage). Distances in float64.

    Returns:
        (precision, recall), each in [0, 1].
    """
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"precision_recall needs more than k={k} samples per set, got {real.shape[0]}, {fake.shape[0]}"
        )
    real_radii = _kth_neighbour_radius(real, k, chunk)
    fake_radii = _kth_neighbour_radius(fake, k, chunk)
    precision = _inside_manifold(fake, real, real_radii, chunk).double().mean()
    recall = _inside_manifold(real, fake, fake_radii, chunk).double().mean()
    return float(precision), float(recall)


def memorisation_report(
    gen_pixels: Tensor | np.ndarray,
    gen_feats: Tensor | np.ndarray,
    train_pixels: Tensor | np.ndarray,
    train_feats: Tensor | np.ndarray,
    test_pixels: Tensor | np.ndarray,
    test_feats: Tensor | np.ndarray,
    top: int = 8,
) -> dict[str, Any]:
    """Does the model copy its training images? Nearest training image of every generated image.

    The baseline is the same statistic for real held-out (test) images: how close an unseen real
    cell comes to its nearest training cell. Generated images much closer than that are copy
    candidates (cf. Carlini et al. 2023, "Extracting Training Data from Diffusion Models"; Somepalli
    et al. 2023). Pixel distances are Euclidean on the flattened images as given (use one scale,
    e.g. [-1, 1], for all three sets); feature distances in the classifier's feature space.

    Returns:
        A dict with, for ``pixel`` and ``feature`` space: median nearest-training distance of
        generated and of test images, their ratio, the 1st percentile of the test-to-train
        distances, and the fraction of generated images below it (the copy indicator, ≈ 0.01 for a
        model that does not copy); ``copy_candidates`` (generated indices below the pixel
        threshold) and ``closest_pairs``: the ``top`` generated images closest to a training image
        in pixel space, closest first.
    """
    report: dict[str, Any] = {
        "num_generated": len(gen_pixels),
        "num_train": len(train_pixels),
        "num_test": len(test_pixels),
    }
    nearest: dict[str, tuple[Tensor, Tensor]] = {}
    for space, gen, train, test in (
        ("pixel", gen_pixels, train_pixels, test_pixels),
        ("feature", gen_feats, train_feats, test_feats),
    ):
        gen_d, gen_i = nearest_neighbours(gen, train)
        test_d, _ = nearest_neighbours(test, train)
        threshold = float(torch.quantile(test_d, 0.01))
        gen_median, test_median = float(gen_d.median()), float(test_d.median())
        report[space] = {
            "gen_to_train_median": gen_median,
            "test_to_train_median": test_median,
            "median_ratio": gen_median / test_median if test_median > 0 else math.nan,
            "test_to_train_p01": threshold,
            "fraction_below_test_p01": float((gen_d < threshold).double().mean()),
        }
        nearest[space] = (gen_d, gen_i)
        if space == "pixel":
            report["copy_candidates"] = torch.nonzero(gen_d < threshold)[:, 0].tolist()
    pixel_d, pixel_i = nearest["pixel"]
    feature_d, feature_i = nearest["feature"]
    order = torch.argsort(pixel_d, stable=True)[:top]
    report["closest_pairs"] = [
        {
            "generated": int(g),
            "train": int(pixel_i[g]),
            "pixel_distance": float(pixel_d[g]),
            "feature_distance_to_nearest": float(feature_d[g]),
            "feature_nearest_train": int(feature_i[g]),
        }
        for g in order
    ]
    return report


# ----------------------------------------------------------------------------------- classifier


@torch.no_grad()
def extract_features(classifier: torch.nn.Module, images: Tensor | np.ndarray, batch_size: int = 256) -> Tensor:
    """Classifier features (N, feature_dim) of images (N, 3, S, S) in [-1, 1] (or uint8), on the CPU.

    Runs in eval mode without gradients on the classifier's device; the mode is restored afterwards.
    """
    return _batched(classifier, images, batch_size, lambda model, x: model.features(x))


@torch.no_grad()
def _batched(classifier: torch.nn.Module, images: Tensor | np.ndarray, batch_size: int, fn: Any) -> Tensor:
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        images = torch.as_tensor(images)
        outputs = [
            fn(classifier, _to_model_input(images[i : i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        classifier.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0)


def classifier_report(
    classifier: torch.nn.Module,
    images: Tensor | np.ndarray,
    requested_labels: Tensor | np.ndarray | Sequence[int],
    class_names: Sequence[str],
    batch_size: int = 256,
) -> dict[str, Any]:
    """Does each generated cell look like the class it was generated as?

    Returns:
        ``accuracy`` (fraction classified as requested), ``per_class_accuracy`` {name: acc} for the
        requested classes present, ``per_class_count``, ``mean_confidence`` (mean probability of
        the requested class) and ``confusion_matrix`` (rows = requested, cols = predicted, counts)
        with ``class_names``.
    """
    requested = torch.as_tensor(np.asarray(requested_labels), dtype=torch.int64).flatten()
    if len(requested) != len(images):
        raise ValueError(f"{len(images)} images but {len(requested)} requested labels")
    probs = _batched(classifier, images, batch_size, lambda model, x: model(x).float().softmax(-1))
    num_classes = len(class_names)
    if probs.shape[1] != num_classes:
        raise ValueError(f"classifier has {probs.shape[1]} classes, class_names has {num_classes}")
    predicted = probs.argmax(1)
    confusion = torch.bincount(requested * num_classes + predicted, minlength=num_classes**2).view(num_classes, -1)
    correct = predicted == requested
    per_class, counts = {}, {}
    for c, name in enumerate(class_names):
        selected = requested == c
        if selected.any():
            per_class[name] = float(correct[selected].double().mean())
            counts[name] = int(selected.sum())
    return {
        "accuracy": float(correct.double().mean()) if len(correct) else math.nan,
        "per_class_accuracy": per_class,
        "per_class_count": counts,
        "mean_confidence": float(probs.gather(1, requested[:, None]).double().mean()) if len(correct) else math.nan,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        "num_samples": len(requested),
    }


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


# ----------------------------------------------------------------------------------- reports


def _format(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if value is None:
        return "–"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) with the given ``columns`` (missing cells: –)."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        cells = [_format(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist() if value.ndim else value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    return value


# Scalars of the top-level dict, with the sample count each Fréchet figure was measured at.
# (``frechet_distance_n``, when given, is the generated side of each comparison: per mask family for inpainting.)
_FIDELITY_KEYS = (
    ("frechet_distance", "frechet_distance_n"),
    ("frechet_distance_floor", "frechet_distance_floor_n"),
    ("precision", "frechet_distance_n"),
    ("recall", "frechet_distance_n"),
    ("kernel_distance", "frechet_distance_n"),
    ("kernel_distance_floor", "kernel_distance_floor_n"),
    ("classifier_accuracy_real_test", "num_real"),
)
# Described in the text under the fidelity table rather than listed under "Other".
_FLOOR_TEXT_KEYS = (
    "frechet_distance_reference_n",
    "frechet_distance_comparison",
    "frechet_distance_floor_reference_n",
    "frechet_distance_floor_rest",
    "frechet_distance_floor_draws",
    "frechet_distance_floor_method",
    "kernel_distance_floor_reference_n",
    "inpainting_comparisons",
)


def _floor_text(metrics: dict[str, Any]) -> str:
    """How the score and its floor were measured: the two set sizes of each (for metrics.md)."""
    n, num_real = metrics.get("num_samples"), metrics.get("num_real", "?")
    comparison = metrics.get("frechet_distance_comparison") or f"{n} generated vs {num_real} real images"
    floor_n = metrics.get("frechet_distance_floor_n", "?")
    method = metrics.get("frechet_distance_floor_method") or f"{floor_n} real images vs other real images"
    text = f"Fréchet distance: {comparison}. Floor (a perfect generator's expected score at these sizes): {method}."
    if metrics.get("frechet_distance_floor_rest", metrics.get("frechet_distance_floor")) != metrics.get("frechet_distance_floor"):
        text += (f" Against the {metrics.get('num_real', 0) - floor_n if isinstance(floor_n, int) else '?'} other real "
                 f"cells alone, without the extrapolation, it is {_format(metrics['frechet_distance_floor_rest'])}.")  # fmt: skip
    compared = metrics.get("frechet_distance_n", n)
    if isinstance(compared, int) and isinstance(floor_n, int) and floor_n < compared:
        text += (f" The floor can use at most half of the real cells ({floor_n}), fewer than the score's {compared}: "
                 "it is higher than a perfect generator would score.")  # fmt: skip
    if "kernel_distance_floor_reference_n" in metrics:
        text += (f" Kernel distance floor: {metrics.get('kernel_distance_floor_n')} real cells vs the other "
                 f"{metrics['kernel_distance_floor_reference_n']} (unbiased at any sizes: 0 in expectation).")  # fmt: skip
    if metrics.get("inpainting_comparisons"):
        text += f"\n\n{metrics['inpainting_comparisons']}"
    return text


def write_report(metrics: dict[str, Any], output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` (a Markdown table per section) into ``output_dir``.

    Expected keys (others are listed in an "other" table): ``frechet_distance``, ``num_samples``
    (generated images), ``frechet_distance_floor`` and ``frechet_distance_floor_n``, ``num_real``,
    ``precision``, ``recall``, ``feature_space``; optional sections ``classifier``
    (``classifier_report``), ``memorisation`` (``memorisation_report``), ``inception``
    (``inception_metrics``' dict) or ``inception_skipped`` (its reason).

    Returns:
        The paths of metrics.json and metrics.md.
    """
    missing = [k for k in ("frechet_distance", "frechet_distance_floor", "num_samples") if k not in metrics]
    if missing:
        raise ValueError(f"write_report: metrics lacks {', '.join(missing)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")

    sections = ["# celldiff evaluation\n"]
    space = metrics.get("feature_space", "cell classifier features")
    rows = [
        {"metric": key, "value": metrics[key], "n": metrics.get(n_key, metrics.get("num_samples"))}
        for key, n_key in _FIDELITY_KEYS
        if key in metrics
    ]
    sections.append(f"## Fidelity ({space})\n\n" + markdown_table(rows, ["metric", "value", "n"]))
    sections.append(f"{_floor_text(metrics)}\n\n{SMALL_N_NOTE}\n")

    inception = metrics.get("inception")
    if inception:
        labels = {"inception_fid": "FID", "inception_kid_mean": "KID (mean)", "inception_kid_std": "KID (std)"}
        n = inception.get("num_generated")
        rows = [{"metric": label, "value": inception.get(key), "n": n} for key, label in labels.items()]
        sections.append(
            "## Inception (ImageNet features)\n\n"
            + markdown_table(rows, ["metric", "value", "n"])
            + f"FID: {inception.get('num_generated')} generated vs {inception.get('num_real')} real images. {SMALL_N_NOTE}\n"
        )
    elif metrics.get("inception_skipped"):
        sections.append(f"## Inception (ImageNet features)\n\n{metrics['inception_skipped']}\n")

    per_class = metrics.get("per_class")
    if per_class:
        sections.append(
            "## Fréchet distance per class\n\n"
            + markdown_table(
                per_class, ["class", "frechet_distance", "floor", "n_generated", "compared_n", "reference_n", "n_real"]
            )
            + "\nGenerated cells are counted under the class they were asked for (class-conditional), the class of the "
            "real cell they complete (inpainting), or else the class the classifier gives them. Each distance compares "
            "compared_n generated cells of the class (inpainting: per mask family, then averaged) with reference_n real "
            "test cells of the class (inpainting: those not inpainted); its floor, compared_n real cells of the class "
            "against the others at the same sizes. "
            f"{SMALL_N_NOTE}\n"
        )
    inpainting = metrics.get("inpainting")
    if inpainting:
        columns = ["family", "n", "mse", "psnr", "ssim", "seam"] + (["lpips"] if "lpips" in inpainting[0] else [])
        columns += [c for c in ("frechet_distance", "floor", "precision", "recall") if c in inpainting[0]]
        sections.append(
            "## Masked-region metrics per mask family\n\n"
            + markdown_table(inpainting, columns)
            + "\nOver the missing pixels only, intensities in [0, 1]: MSE, PSNR (dB) and SSIM (mean of the SSIM map inside "
            "the mask); seam: mean |gradient| mismatch with the real image on the mask boundary (0 = as in the real cell). "
            + (f"{metrics['lpips_skipped']}\n" if metrics.get("lpips_skipped") else "LPIPS (AlexNet) on the whole image.\n")
            + ("Fréchet distance, precision and recall: the family's completions against the test cells that were not "
               "inpainted, next to the real-vs-real floor at the same sizes.\n" if "frechet_distance" in inpainting[0] else "")
        )

    report = metrics.get("classifier")
    if report:
        names = report["class_names"]
        rows = [
            {"class": name, "accuracy": acc, "n": report["per_class_count"].get(name)}
            for name, acc in report["per_class_accuracy"].items()
        ]
        rows.append({"class": "all", "accuracy": report["accuracy"], "n": report["num_samples"]})
        confusion = [
            {"requested \\ predicted": names[i], **dict(zip(names, row, strict=True))}
            for i, row in enumerate(report["confusion_matrix"])
            if sum(row)
        ]
        sections.append(
            "## Classifier agreement (generated as → classified as)\n\n"
            + markdown_table(rows, ["class", "accuracy", "n"])
            + f"\nMean probability of the requested class: {_format(report.get('mean_confidence'))}\n\n"
            + markdown_table(confusion, ["requested \\ predicted", *names])
        )

    memo = metrics.get("memorisation")
    if memo:
        rows = [{"space": space_name, **memo[space_name]} for space_name in ("pixel", "feature") if space_name in memo]
        columns = [
            "space",
            "gen_to_train_median",
            "test_to_train_median",
            "median_ratio",
            "test_to_train_p01",
            "fraction_below_test_p01",
        ]
        sections.append(
            "## Memorisation (nearest training image)\n\n"
            + f"{memo.get('num_generated')} generated, {memo.get('num_test')} test, {memo.get('num_train')} train images. "
            + "A model that does not copy has about 1% of generated images below the test images' 1st percentile.\n\n"
            + markdown_table(rows, columns)
            + f"\nCopy candidates (generated indices): {memo.get('copy_candidates') or 'none'}\n\n"
            + markdown_table(
                memo.get("closest_pairs", []),
                ["generated", "train", "pixel_distance", "feature_distance_to_nearest", "feature_nearest_train"],
            )
        )

    known = {k for pair in _FIDELITY_KEYS for k in pair} | set(_FLOOR_TEXT_KEYS) | {
        "num_real",
        "feature_space",
        "inception",
        "inception_skipped",
        "classifier",
        "memorisation",
        "lpips_skipped",
    }
    other = [{"key": k, "value": v} for k, v in metrics.items() if k not in known and not isinstance(v, dict | list)]
    if other:
        sections.append("## Other\n\n" + markdown_table(other, ["key", "value"]))
    md_path.write_text("\n".join(sections))
    return json_path, md_path
