"""Distances between sets of generated and real cells: Fréchet and kernel distances with their
real-vs-real floors, precision/recall, nearest neighbours and memorisation.

Pure functions on tensors: features (N, D) (the judge's, see ``celldiff.evaluation.judge``) or
images flattened to (N, 3·S·S), with the statistics in float64. ``compare_sets`` and ``real_floors``
are the figures of one comparison that ``celldiff.evaluation.run`` reports.

Adding a metric: its function here, its entry in ``compare_sets`` (and its floor in
``real_floors``), and its row in ``celldiff.evaluation.report``; nothing else changes.

Fréchet distances are biased upwards at small sample sizes (Chong & Forsyth 2020, "Effectively
Unbiased FID and Inception Score and where to find them"): compare figures only at equal n, and
against ``frechet_floor_details`` (n real cells against the other real cells: the score's set sizes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

PR_NEIGHBOURS = 3  # k of precision/recall (Kynkäänniemi et al. 2019)
MIN_SET = PR_NEIGHBOURS + 1  # the fewest points per set every metric of compare_sets needs (a Fréchet distance: 2)
FLOOR_DRAWS = 8  # random draws the real-vs-real floor averages over


# ----------------------------------------------------------------------------------- helpers


def _as_float64(x: Tensor | np.ndarray) -> Tensor:
    """Features or images (N, ...) as a float64 CPU tensor (N, D)."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu().flatten(1).double()


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root (D, D) of a symmetric positive semi-definite matrix (D, D) by eigendecomposition."""
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


# ----------------------------------------------------------------------------------- one comparison


def compare_sets(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray) -> dict[str, float]:
    """Every set metric of generated features (n, D) against real reference features (N, D).

    The keys are those of ``metrics.json`` (evaluation averages them over mask families and puts
    them in the per-family rows); each set needs at least ``MIN_SET`` points.
    """
    precision, recall = precision_recall(real_feats, fake_feats, k=PR_NEIGHBOURS)
    return {
        "frechet_distance": frechet_distance(real_feats, fake_feats),
        "kernel_distance": kernel_distance(real_feats, fake_feats),
        "precision": precision,
        "recall": recall,
    }


def real_floors(real_feats: Tensor | np.ndarray, n: int, reference_n: int, seed: int) -> dict[str, Any]:
    """What a perfect generator would score in a comparison of ``n`` generated against ``reference_n`` real cells.

    Real features (N, D) stand in for the generated ones, drawn with generators seeded by ``seed``
    (reproducible floors). Returns the ``metrics.json`` keys of the Fréchet floor (see
    ``frechet_floor_details``) and of the kernel floor (``kernel_distance_floor``).
    """
    details = frechet_floor_details(real_feats, n, torch.Generator().manual_seed(seed), reference_n=reference_n)
    kernel_floor, kernel_n = kernel_distance_floor(real_feats, n, torch.Generator().manual_seed(seed))
    return {
        "frechet_distance_floor": details["floor"],
        "frechet_distance_floor_n": details["n"],
        "frechet_distance_floor_reference_n": details["reference_n"],
        "frechet_distance_floor_rest": details["floor_rest"],
        "frechet_distance_floor_draws": details["draws"],
        "frechet_distance_floor_method": details["method"],
        "kernel_distance_floor": kernel_floor,
        "kernel_distance_floor_n": kernel_n,
        "kernel_distance_floor_reference_n": len(real_feats) - kernel_n,
    }


# ----------------------------------------------------------------------------------- class mix
def class_fractions(labels: Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of each class among integer ``labels`` (N,) -> (num_classes,) float64 summing to 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]
    return counts / max(int(counts.sum()), 1)


def class_mix_error(
    fake_predicted: Tensor | np.ndarray, real_predicted: Tensor | np.ndarray, num_classes: int, seed: int = 0
) -> dict[str, Any]:
    """How far the class mix of generated cells is from the data's: total variation between class fractions.

    Both sides are the judge's *predicted* classes (generated cells have no true class; using the judge's
    labels on the real cells too cancels its own confusions to first order). TV = ½ Σ_c |p_c - q_c|, in
    [0, 1]: the fraction of generated cells that would have to change class to match the data. The floor
    is the TV of n real cells (n = the generated count, drawn without replacement when n < N, with
    replacement otherwise) against all N, averaged over ``FLOOR_DRAWS`` draws: what sampling noise alone gives.

    Args:
        fake_predicted: (n,) judge labels of the generated cells. real_predicted: (N,) judge labels of the
            real test cells. num_classes: C. seed: Seed of the floor's draws.

    Returns:
        ``total_variation``, ``total_variation_floor``, ``generated_fractions`` and ``real_fractions`` (lists of C).
    """
    fake, real = np.asarray(fake_predicted).ravel(), np.asarray(real_predicted).ravel()
    p, q = class_fractions(fake, num_classes), class_fractions(real, num_classes)
    rng = np.random.default_rng(seed)
    draws = [rng.choice(real, size=len(fake), replace=len(fake) >= len(real)) for _ in range(FLOOR_DRAWS)]
    floor = float(np.mean([0.5 * np.abs(class_fractions(d, num_classes) - q).sum() for d in draws]))
    return {"total_variation": float(0.5 * np.abs(p - q).sum()), "total_variation_floor": floor,
            "generated_fractions": p.tolist(), "real_fractions": q.tolist()}  # fmt: skip
