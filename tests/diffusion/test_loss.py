"""Min-SNR-γ loss weighting (Hang et al. 2023): closed-form weights, bounds, the uniform path untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from celldiff.diffusion.loss import DiffusionLoss
from celldiff.diffusion.schedule import NoiseSchedule, min_snr_weight
from celldiff.training.module import DiffusionModule
from tests.training.helpers import TINY, tiny_module

T = 1000
CHOSEN_T = [0, 1, 5, 20, 100, 250, 500, 750, 900, 999]


def numpy_alpha_bar(schedule: str, steps: int = T) -> np.ndarray:
    """alpha_bar from the papers' betas, written out independently of celldiff.diffusion.schedule."""
    if schedule == "linear":  # Ho et al. 2020: 1e-4 .. 0.02 at T = 1000
        betas = np.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=np.float64)
    else:  # Nichol & Dhariwal 2021, eq. 17, s = 0.008, betas clipped at 0.999
        s = 0.008
        f = np.cos((np.arange(steps + 1, dtype=np.float64) / steps + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


def numpy_weight(alpha_bar: np.ndarray, gamma: float, prediction_type: str) -> np.ndarray:
    snr = alpha_bar / (1 - alpha_bar)
    denominator = snr if prediction_type == "eps" else snr + 1
    return np.minimum(snr, gamma) / denominator


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_weight_matches_the_closed_form(schedule, prediction_type, gamma):
    t = torch.tensor(CHOSEN_T)
    expected = numpy_weight(numpy_alpha_bar(schedule)[CHOSEN_T], gamma, prediction_type)
    sched = NoiseSchedule(schedule, T)
    got = min_snr_weight(sched.alpha_bar[t], gamma, prediction_type)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=0)
    # The module's per-sample weight (float32) is the same function of t for its prediction type.
    module = tiny_module(num_timesteps=T, beta_schedule=schedule, prediction_type=prediction_type,
                         loss_weighting="min_snr", min_snr_gamma=gamma)  # fmt: skip
    weight = module.loss.weight(t)
    assert weight.dtype == torch.float32 and weight.shape == (len(CHOSEN_T),)
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6, atol=0)


def test_weight_shapes_the_loss_as_the_paper_says():
    """ε: 1 wherever SNR < γ (the noisy half), γ / SNR below; v: SNR / (SNR + 1) = abar, then γ / (SNR + 1)."""
    sched = NoiseSchedule("linear", T)
    snr = (sched.alpha_bar / (1 - sched.alpha_bar)).numpy()
    eps = min_snr_weight(sched.alpha_bar, 5.0, "eps").numpy()
    v = min_snr_weight(sched.alpha_bar, 5.0, "v").numpy()
    noisy = snr < 5.0
    assert noisy.any() and (~noisy).any()
    assert (eps[noisy] == 1.0).all()  # exactly 1: no 0/0 however small SNR gets
    np.testing.assert_allclose(eps[~noisy], 5.0 / snr[~noisy], rtol=1e-12)
    np.testing.assert_allclose(v[noisy], sched.alpha_bar.numpy()[noisy], rtol=1e-12)
    np.testing.assert_allclose(v[~noisy], 5.0 / (snr[~noisy] + 1), rtol=1e-9)
    assert np.all(np.diff(eps) >= 0)  # more weight as the noise grows


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_weight_is_bounded_and_finite_at_both_ends(schedule, prediction_type):
    sched = NoiseSchedule(schedule, T)
    w = min_snr_weight(sched.alpha_bar, 5.0, prediction_type)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    assert w[0] > 0 and w[T - 1] > 0  # t = 0 (SNR ~ 1e4) and t = T - 1 (SNR ~ 4e-5 linear, ~0 cosine)
    # The limits themselves: SNR = 0 (alpha_bar = 0), SNR = inf (alpha_bar = 1) and just inside them.
    extremes = torch.tensor([0.0, 1e-300, 1e-12, 1 - 1e-15, 1.0], dtype=torch.float64)
    w = min_snr_weight(extremes, 5.0, prediction_type)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    if prediction_type == "eps":
        assert w.tolist()[:3] == [1.0, 1.0, 1.0] and w[-1] == 0.0
    else:
        assert w[0] == 0.0 and w[-1] == 0.0


def _batch(n: int = 4, size: int = 16, inpainting: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "label": torch.zeros(n, dtype=torch.long)}
    if inpainting:
        mask = torch.zeros(n, 1, size, size)
        mask[:, :, 4:12, 4:12] = 1.0
        batch["mask"] = mask
    return batch


def _perturbed(module: DiffusionModule) -> DiffusionModule:
    with torch.no_grad():  # a non-trivial network, so the loss depends on t
        g = torch.Generator().manual_seed(5)
        for p in module.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.filterwarnings("ignore")
def test_uniform_is_bitwise_the_old_loss(monkeypatch):
    module = _perturbed(tiny_module())
    batch = _batch()
    loss = module.training_step(batch, 0)
    # The formula before loss weighting existed, step by step.
    x0 = batch["image"]
    t, noise, _ = module.loss.draws(x0, 0, 0)
    old = module.diffusion_loss(x0, t, noise.to(x0.dtype), {"class_labels": None}, module.unet).mean()
    assert torch.equal(loss, old)
    # And the uniform path never asks for a weight, so it cannot multiply by one.
    monkeypatch.setattr(DiffusionLoss, "weight", lambda self, t: pytest.fail("uniform looked up a weight"))
    assert torch.equal(module.training_step(batch, 0), old)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("inpainting", [False, True], ids=["plain", "inpainting-mask-weighted"])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_min_snr_weights_each_sample_and_leaves_validation_plain(inpainting, prediction_type):
    extra = dict(inpainting=True, mask_loss_weight=10.0) if inpainting else {}
    plain = _perturbed(tiny_module(prediction_type=prediction_type, **extra))
    weighted = _perturbed(tiny_module(prediction_type=prediction_type, loss_weighting="min_snr", **extra))
    batch = _batch(n=16, inpainting=inpainting)
    x0 = batch["image"]
    t, noise, _ = weighted.loss.draws(x0, 0, 0)
    per_sample = weighted.diffusion_loss(x0, t, noise, weighted.network_condition(batch), weighted.unet)
    w = numpy_weight(numpy_alpha_bar("linear", TINY["num_timesteps"])[t.numpy()], 5.0, prediction_type)
    assert (w < 0.99).any()  # some timesteps of this batch are really down-weighted
    expected = (per_sample * torch.tensor(w, dtype=torch.float32)).mean()
    torch.testing.assert_close(weighted.training_step(batch, 0), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(weighted.training_step(batch, 0), plain.training_step(batch, 0))
    # Validation reports the plain MSE whatever the training weighting: runs stay comparable.
    assert torch.equal(weighted.validation_step(batch, 0), plain.validation_step(batch, 0))


def test_bad_weighting_or_gamma_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model.loss_weighting must be one of \('uniform', 'min_snr'\), got 'snr'"):
        tiny_module(loss_weighting="snr")
    for gamma in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="model.min_snr_gamma must be a finite number > 0"):
            tiny_module(loss_weighting="min_snr", min_snr_gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        min_snr_weight(torch.tensor([0.5]), 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weight(torch.tensor([0.5]), 5.0, "x0")


def test_weighting_is_a_training_choice_not_architecture():
    assert "loss_weighting" not in DiffusionModule.CHECKPOINT_ARCH_KEYS
    assert "min_snr_gamma" not in DiffusionModule.CHECKPOINT_ARCH_KEYS
    doc = DiffusionModule.__doc__
    assert "loss_weighting:" in doc and "min_snr_gamma:" in doc  # LightningCLI's --help shows these


def test_global_batch_draws_are_sliced_per_rank():
    """Two ranks with batch 3 draw exactly what one process with batch 6 draws, each its own half."""
    loss = DiffusionLoss(NoiseSchedule("linear", 100), seed=7)
    x0 = torch.zeros(6, 3, 8, 8)
    whole = loss.draws(x0, 5, 2, with_labels=True)
    halves = [loss.draws(x0[:3], 5, 2, rank=r, world=2, with_labels=True) for r in (0, 1)]
    for i, field in enumerate(("t", "noise", "label_drop")):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i]), field
    assert loss.draws(x0, 5, 2).label_drop is None
    assert not torch.equal(loss.draws(x0, 5, 3).noise, whole.noise)  # another micro-batch of the same step
    assert torch.equal(DiffusionLoss(NoiseSchedule("linear", 100), seed=7).draws(x0, 5, 2).t, whole.t)  # resumable
    assert whole.t.dtype == torch.long and whole.noise.dtype == torch.float32


def test_mask_weighting_and_timestep_buckets_of_the_loss_callable():
    loss = DiffusionLoss(NoiseSchedule("linear", 100), mask_loss_weight=10.0)
    x0, noise = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1  # half the pixels
    wrong_inside = lambda x_t, t: torch.where(mask.expand(-1, 3, -1, -1) > 0, 0.0, 1.0)  # noqa: E731
    t = torch.tensor([3, 60])
    assert loss(wrong_inside, x0, t, noise).tolist() == pytest.approx([0.5, 0.5])  # no mask: the plain MSE
    assert loss(wrong_inside, x0, t, noise, mask).tolist() == pytest.approx([10 / 11, 10 / 11])
    buckets = list(loss.timestep_buckets(torch.arange(8.0)))
    assert [(name, count) for name, _, count in buckets] == [
        ("loss_t0000-0025", 2), ("loss_t0025-0050", 2), ("loss_t0050-0075", 2), ("loss_t0075-0100", 2)]  # fmt: skip
    assert [v.item() for _, v, _ in buckets] == [0.5, 2.5, 4.5, 6.5]
