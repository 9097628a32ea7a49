"""Distances between sets of cells on toy data with known answers: Fréchet and kernel distances, their
floors, precision/recall, nearest neighbours, memorisation (moved from tests/test_evaluation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celldiff.evaluation.distances import (
    MIN_SET,
    compare_sets,
    frechet_distance,
    frechet_distance_floor,
    frechet_floor_details,
    kernel_distance,
    kernel_distance_floor,
    memorisation_report,
    nearest_neighbours,
    precision_recall,
    real_floors,
)


def _exact_gaussian_sample(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean and (unbiased) covariance are exactly ``mean`` and diag(std²)."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    cov = z.T @ z / (n - 1)
    whitened = z @ torch.linalg.inv(torch.linalg.cholesky(cov)).T  # sample covariance = I
    return whitened * std + mean


# ----------------------------------------------------------------------------------- Fréchet


def test_frechet_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    total_variance = float(torch.cov(feats.T.double()).trace())
    assert frechet_distance(feats, feats) < 1e-6 * total_variance
    assert frechet_distance(feats.numpy(), feats.numpy()) < 1e-6 * total_variance


def test_frechet_matches_the_closed_form_for_diagonal_gaussians():
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    a = _exact_gaussian_sample(300, mean_a.double(), var_a.double().sqrt(), seed=1)
    b = _exact_gaussian_sample(200, mean_b.double(), var_b.double().sqrt(), seed=2)
    # ||μa − μb||² + Σ (σa² + σb² − 2 σa σb) for diagonal covariances.
    expected = float((mean_a - mean_b).square().sum() + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_frechet_is_symmetric_and_grows_with_a_mean_shift():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(400, 16, generator=gen) @ torch.randn(16, 16, generator=gen)  # correlated features
    b = torch.randn(400, 16, generator=gen)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    direction = torch.randn(16, generator=gen)
    distances = [frechet_distance(a, a + s * direction) for s in (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)]
    assert all(x < y for x, y in zip(distances, distances[1:], strict=False))
    # A pure shift moves only the mean term: d = s² ||direction||².
    assert distances[-1] == pytest.approx(25 * float(direction.double().square().sum()), rel=1e-6)


def test_frechet_floor_uses_disjoint_halves_reproducibly():
    feats = torch.randn(101, 8, generator=torch.Generator().manual_seed(4))
    floor, n = frechet_distance_floor(feats, generator=torch.Generator().manual_seed(0))
    assert n == 50 and floor > 0
    again, _ = frechet_distance_floor(feats, generator=torch.Generator().manual_seed(0))
    assert again == floor
    _, n_small = frechet_distance_floor(feats, n=20, generator=torch.Generator().manual_seed(0))
    assert n_small == 20
    _, n_capped = frechet_distance_floor(feats, n=1000)
    assert n_capped == 50


def test_frechet_floor_matches_a_perfect_generator_at_the_scores_set_sizes():
    """The score is n generated vs all N real: a perfect generator (samples of the real distribution)
    must land on the floor on average. The old floor (n real vs n other real) was far above it."""
    gen = torch.Generator().manual_seed(7)
    mixing = torch.randn(16, 16, generator=gen) / 4
    real_n = 1000
    for n in (64, 256):
        scores, floors, old = [], [], []
        for _ in range(10):
            real = torch.randn(real_n, 16, generator=gen) @ mixing
            perfect = torch.randn(n, 16, generator=gen) @ mixing
            scores.append(frechet_distance(real, perfect))
            floors.append(frechet_distance_floor(real, n=n, generator=gen)[0])
            order = torch.randperm(real_n, generator=gen)
            old.append(frechet_distance(real[order[:n]], real[order[n : 2 * n]]))
        assert 0.8 <= np.mean(floors) / np.mean(scores) <= 1.25, (n, np.mean(floors), np.mean(scores))
        assert np.mean(old) / np.mean(scores) > 1.4  # what the n-vs-n floor reported


def test_frechet_floor_details_name_the_set_sizes():
    feats = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    details = frechet_floor_details(feats, n=50, generator=torch.Generator().manual_seed(0), draws=4)
    assert (details["n"], details["reference_n"], details["rest_n"], details["draws"]) == (50, 300, 250, 4)
    assert "50 real cells drawn at random against the other 250" in details["method"] and "to the score's 300" in details["method"]
    assert details["floor"] < details["floor_rest"]  # the reference of 250, extrapolated to 300: less bias
    # A score against the N - n cells left over (inpainting): exactly its sizes, no extrapolation.
    paired = frechet_floor_details(feats, n=50, generator=torch.Generator().manual_seed(0), draws=4, reference_n=250)
    assert paired["reference_n"] == 250 and paired["floor"] == paired["floor_rest"] and "extrapolated" not in paired["method"]


# ----------------------------------------------------------------------------------- precision / recall


def test_precision_recall_on_toy_distributions():
    gen = torch.Generator().manual_seed(5)
    real = torch.randn(1000, 4, generator=gen)
    same = torch.randn(1000, 4, generator=gen)
    precision, recall = precision_recall(real, same, k=3)
    assert precision > 0.8 and recall > 0.8

    far = torch.randn(500, 4, generator=gen) + 20.0
    precision, recall = precision_recall(real, far, k=3)
    assert precision == 0.0 and recall == 0.0

    # Real data has two modes; the fakes cover one of them: faithful (high precision), half the coverage.
    offset = torch.tensor([30.0, 0, 0, 0])
    two_modes = torch.cat([torch.randn(500, 4, generator=gen), torch.randn(500, 4, generator=gen) + offset])
    one_mode = torch.randn(1000, 4, generator=gen)
    precision, recall = precision_recall(two_modes, one_mode, k=3)
    assert precision > 0.85
    assert recall == pytest.approx(0.5, abs=0.06)


# ----------------------------------------------------------------------------------- nearest neighbours, memorisation


def test_nearest_neighbours_matches_brute_force_and_finds_exact_copies():
    gen = torch.Generator().manual_seed(6)
    refs = torch.rand(50, 3, 8, 8, generator=gen) * 2 - 1
    queries = torch.cat([torch.rand(7, 3, 8, 8, generator=gen) * 2 - 1, refs[[13, 41]]])
    distances, indices = nearest_neighbours(queries, refs, chunk=4)
    brute = torch.cdist(
        queries.flatten(1).double(), refs.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    assert torch.equal(indices, brute.argmin(1))
    assert torch.allclose(distances, brute.min(1).values, rtol=1e-12)
    assert indices[-2:].tolist() == [13, 41] and distances[-2:].tolist() == [0.0, 0.0]


def test_memorisation_flags_a_planted_copy_and_nothing_else():
    gen = torch.Generator().manual_seed(7)
    train = torch.rand(200, 3, 8, 8, generator=gen) * 2 - 1
    test = torch.rand(100, 3, 8, 8, generator=gen) * 2 - 1
    generated = torch.rand(30, 3, 8, 8, generator=gen) * 2 - 1
    generated[11] = train[42]  # a verbatim copy of a training image
    project = torch.randn(192, 16, generator=gen)

    def feats(x: torch.Tensor) -> torch.Tensor:  # stand-in for classifier features
        return x.flatten(1) @ project

    report = memorisation_report(generated, feats(generated), train, feats(train), test, feats(test), top=5)
    first = report["closest_pairs"][0]
    assert (first["generated"], first["train"], first["pixel_distance"]) == (11, 42, 0.0)
    assert first["feature_nearest_train"] == 42 and first["feature_distance_to_nearest"] == pytest.approx(0, abs=1e-9)
    assert report["copy_candidates"] == [11]
    assert report["pixel"]["fraction_below_test_p01"] == pytest.approx(1 / 30)
    assert len(report["closest_pairs"]) == 5
    # Non-copies sit where unseen real images sit.
    assert 0.8 < report["pixel"]["median_ratio"] < 1.2
    assert report["num_generated"] == 30 and report["num_train"] == 200 and report["num_test"] == 100


def test_kernel_distance_matches_the_unbiased_mmd_formula_and_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen).double(), torch.randn(7, 3, generator=gen).double() + 0.5

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3

    within_a = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / 20
    within_b = sum(k(b[i], b[j]) for i in range(7) for j in range(7) if i != j) / 42
    across = sum(k(a[i], b[j]) for i in range(5) for j in range(7)) / 35
    assert kernel_distance(a, b) == pytest.approx(within_a + within_b - 2 * across, rel=1e-9)
    # one distribution: mean over draws near 0 at a small n (FD would be biased far above 0 here)
    draws = [kernel_distance(torch.randn(16, 8, generator=gen), torch.randn(400, 8, generator=gen)) for _ in range(200)]
    shifted = kernel_distance(torch.randn(16, 8, generator=gen) + 1.0, torch.randn(400, 8, generator=gen))
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))
    assert shifted > 10 * np.std(draws)
    floor, n = kernel_distance_floor(torch.randn(100, 8, generator=gen), n=80, generator=gen)
    assert n == 50 and abs(floor) < shifted
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(a[:1], b)


# ----------------------------------------------------------------------------------- one comparison


def test_compare_sets_and_real_floors_are_the_figures_of_one_comparison():
    gen = torch.Generator().manual_seed(8)
    real, fake = torch.randn(120, 6, generator=gen), torch.randn(30, 6, generator=gen) + 0.5
    figures = compare_sets(real, fake)
    assert figures == {"frechet_distance": frechet_distance(real, fake), "kernel_distance": kernel_distance(real, fake),
                       **dict(zip(("precision", "recall"), precision_recall(real, fake, k=3), strict=True))}  # fmt: skip
    floors = real_floors(real, 30, 90, seed=4)
    details = frechet_floor_details(real, 30, torch.Generator().manual_seed(4), reference_n=90)
    kernel, kernel_n = kernel_distance_floor(real, 30, torch.Generator().manual_seed(4))
    assert floors["frechet_distance_floor"] == details["floor"] and floors["frechet_distance_floor_n"] == 30
    assert floors["frechet_distance_floor_reference_n"] == 90 and floors["frechet_distance_floor_method"] == details["method"]
    assert (floors["kernel_distance_floor"], floors["kernel_distance_floor_n"]) == (kernel, kernel_n)
    assert floors["kernel_distance_floor_reference_n"] == 120 - kernel_n
    assert MIN_SET == 4  # precision/recall with k = 3 need more than 3 points per set
    with pytest.raises(ValueError, match="more than k=3"):
        compare_sets(real, fake[:3])


def test_class_mix_error_is_the_total_variation_with_a_sampling_floor() -> None:
    from celldiff.evaluation.distances import class_fractions, class_mix_error

    assert class_fractions([0, 0, 1, 3], 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    real = np.repeat(np.arange(4), [40, 30, 20, 10])  # fractions 0.4 0.3 0.2 0.1
    same = class_mix_error(real.copy(), real, 4)
    assert same["total_variation"] == 0.0 and same["real_fractions"] == [0.4, 0.3, 0.2, 0.1]
    one_class = class_mix_error(np.zeros(50, dtype=int), real, 4)  # all class 0: 0.6 of the mass must move
    assert one_class["total_variation"] == pytest.approx(0.6)
    swapped = class_mix_error(np.repeat(np.arange(4), [10, 20, 30, 40]), real, 4)
    assert swapped["total_variation"] == pytest.approx(0.5 * (0.3 + 0.1 + 0.1 + 0.3))
    # The floor: n real cells against all of them; it shrinks with n and is 0 when n = N without replacement.
    small, large = class_mix_error(real[:10], real, 4, seed=1), class_mix_error(real[:90], real, 4, seed=1)
    assert 0 < large["total_variation_floor"] < small["total_variation_floor"] < 0.5
    assert class_mix_error(real[:99], real, 4)["total_variation_floor"] < 0.02
