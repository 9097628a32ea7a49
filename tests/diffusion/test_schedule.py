"""Reference values and identities of the noise schedules (celldiff.diffusion.schedule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from celldiff.diffusion.schedule import (
    NoiseSchedule,
    cosine_beta_schedule,
    diffuse,
    eps_from_x0,
    extract,
    linear_beta_schedule,
    log_snr,
    make_beta_schedule,
    q_posterior_mean_variance,
    snr,
    x0_from_eps,
)


def test_linear_reference_values() -> None:
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    # Independent reference: numpy float64 linspace and cumprod.
    ref_alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    alpha_bar = NoiseSchedule("linear", 1000).alpha_bar
    for t in (0, 499, 999):
        assert abs(alpha_bar[t].item() - ref_alpha_bar[t]) < 1e-12
    assert alpha_bar[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert alpha_bar[999].item() == pytest.approx(4.0358e-5, rel=1e-4)  # well-known value


def test_linear_endpoints_scale_with_num_timesteps() -> None:
    betas = linear_beta_schedule(100)
    assert betas[0].item() == pytest.approx(1e-3, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.2, rel=1e-12)


def test_cosine_follows_closed_form() -> None:
    T, s = 1000, 0.008
    schedule = NoiseSchedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    closed_form = f[1:] / f[0]  # alpha_bar for 0-based index t is f(t + 1) / f(0)
    unclipped = (schedule.betas < 0.999).numpy()
    # Clipping only bites at the very end, where alpha_bar -> 0.
    assert unclipped[:-1].all()
    np.testing.assert_allclose(
        schedule.alpha_bar.numpy()[unclipped], closed_form[unclipped], rtol=1e-10, atol=1e-14
    )
    assert (cosine_beta_schedule(T, max_beta=0.5) <= 0.5).all()
    assert (schedule.betas <= 0.999).all()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_monotone_and_identities(name: str) -> None:
    sch = NoiseSchedule(name, 1000)
    assert (sch.alpha_bar[1:] < sch.alpha_bar[:-1]).all()
    assert 0 < sch.alpha_bar[-1] < sch.alpha_bar[0] < 1
    assert sch.alpha_bar_prev[0] == 1.0
    torch.testing.assert_close(sch.alpha_bar_prev[1:], sch.alpha_bar[:-1], rtol=0, atol=0)
    expected_var = sch.betas * (1 - sch.alpha_bar_prev) / (1 - sch.alpha_bar)
    torch.testing.assert_close(sch.posterior_variance, expected_var, rtol=1e-14, atol=0)
    assert sch.posterior_variance[0] == 0.0
    assert torch.isfinite(sch.posterior_log_variance_clipped).all()
    torch.testing.assert_close(
        sch.sqrt_alpha_bar**2 + sch.sqrt_one_minus_alpha_bar**2,
        torch.ones(1000, dtype=torch.float64),
    )
    for buf in sch.buffers():
        assert buf.dtype == torch.float64
    assert sch.state_dict() == {}  # recomputed from hyperparameters, never checkpointed


def test_posterior_matches_bayes() -> None:
    """q(x_{t-1}|x_t, x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): complete the square independently."""
    sch = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=gen)
    noise = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([1, 10, 200, 500, 999])
    x_t = sch.q_sample(x0, t, noise)
    mean, var, log_var = sch.q_posterior(x0, x_t, t)
    beta = sch.betas[t].view(-1, 1, 1, 1)
    ab_prev = sch.alpha_bar_prev[t].view(-1, 1, 1, 1)
    # Precision-weighted combination of the two Gaussians in x_{t-1}.
    prec_lik, prec_prior = (1 - beta) / beta, 1 / (1 - ab_prev)
    ref_var = 1 / (prec_lik + prec_prior)
    ref_mean = ref_var * ((1 - beta).sqrt() / beta * x_t + ab_prev.sqrt() / (1 - ab_prev) * x0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(log_var, ref_var.log(), rtol=1e-10, atol=1e-12)
    assert mean.dtype == torch.float64 and var.shape == (5, 1, 1, 1)


def test_predict_x0_and_eps_invert_q_sample() -> None:
    sch = NoiseSchedule("cosine", 1000)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=gen) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen)
    t = torch.tensor([0, 250, 700, 999])
    x_t = sch.q_sample(x0, t, noise)
    torch.testing.assert_close(sch.predict_x0_from_eps(x_t, t, noise), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(sch.predict_eps_from_x0(x_t, t, x0), noise, rtol=0, atol=1e-9)


def test_q_sample_statistics() -> None:
    sch = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(2)
    n, c = 20000, 0.7
    for t_val in (0, 100, 500, 999):
        x0 = torch.full((n, 1, 1, 1), c)
        t = torch.full((n,), t_val, dtype=torch.long)
        x_t = sch.q_sample(x0, t, torch.randn(n, 1, 1, 1, generator=gen))
        ab = sch.alpha_bar[t_val].item()
        assert x_t.mean().item() == pytest.approx(
            math.sqrt(ab) * c, abs=4 * math.sqrt(1 - ab) / math.sqrt(n) + 1e-6
        )
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.03)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float32"])
def test_buffers_stay_float64_under_casts(cast: str) -> None:
    sch = NoiseSchedule("linear", 1000)
    reference = sch.alpha_bar.clone()
    parent = torch.nn.Sequential(sch)
    if cast == "half":
        parent.half()
    else:
        parent.to(getattr(torch, cast))
    assert all(b.dtype == torch.float64 for b in sch.buffers())
    assert torch.equal(sch.alpha_bar, reference)  # no precision round trip
    # Half-precision inputs are computed in (and returned as) float32.
    x0 = torch.ones(2, 1, 2, 2, dtype=torch.float16)
    x_t = sch.q_sample(x0, torch.tensor([999, 999]), torch.zeros_like(x0))
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, torch.full_like(x_t, math.sqrt(reference[999].item())))


def test_extract_and_snr() -> None:
    a = torch.arange(10, dtype=torch.float64)
    out = extract(a, torch.tensor([3, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [3.0, 7.0]
    sch = NoiseSchedule("linear", 1000)
    snr = sch.snr(torch.tensor([0, 999]))
    assert snr.dtype == torch.float32
    ab = sch.alpha_bar
    assert snr.tolist() == pytest.approx(
        [(ab[0] / (1 - ab[0])).item(), (ab[-1] / (1 - ab[-1])).item()]
    )


def test_bad_schedule_name() -> None:
    with pytest.raises(ValueError, match="linear, cosine"):
        make_beta_schedule("quadratic", 1000)
    with pytest.raises(ValueError):
        NoiseSchedule("linear", 0)


def test_conversions_give_the_same_numbers_for_a_float_and_a_tensor_alpha_bar() -> None:
    """The samplers pass alpha_bar as a Python float, the schedule methods as a float64 tensor: same bits."""
    sch = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(3)
    x_t, eps, x0 = (torch.randn(1, 3, 4, 4, generator=gen) for _ in range(3))
    for t in (0, 17, 500, 999):
        ab, ab_prev = sch.alpha_bar[t].item(), sch.alpha_bar_prev[t].item()
        tt = torch.tensor([t])
        assert torch.equal(x0_from_eps(x_t, eps, ab), sch.predict_x0_from_eps(x_t, tt, eps))
        assert torch.equal(eps_from_x0(x_t, x0, ab), sch.predict_eps_from_x0(x_t, tt, x0))
        assert torch.equal(diffuse(x0, eps, ab), sch.q_sample(x0, tt, eps))
        mean, var = q_posterior_mean_variance(x0, x_t, ab, ab_prev)
        assert torch.equal(mean, sch.q_posterior(x0, x_t, tt)[0]) and mean.dtype == torch.float32
        assert var == pytest.approx(sch.posterior_variance[t].item(), rel=1e-12, abs=1e-300)
        assert log_snr(ab) == pytest.approx(0.5 * math.log(snr(ab)), rel=1e-12)
        assert log_snr(sch.alpha_bar[t : t + 1]).item() == log_snr(ab)
    assert log_snr(1.0) == math.inf


def test_velocity_and_eps_from_v_invert_each_other() -> None:
    sch = NoiseSchedule("cosine", 1000)
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1, torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 700, 999])
    x_t = sch.q_sample(x0, t, noise)
    v = sch.velocity(x0, t, noise)
    assert v.dtype == torch.float32
    ab = sch.alpha_bar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v.double(), ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sch.eps_from_v(x_t, t, v), noise, rtol=0, atol=1e-5)
