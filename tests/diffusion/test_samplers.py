"""Behaviour of the reverse-process samplers (celldiff.diffusion.samplers) with oracle and tiny models."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from celldiff.diffusion.samplers import SAMPLERS, ModelFn, ddim_step, ddpm_step, dpmsolver_step, sample
from celldiff.diffusion.schedule import NoiseSchedule
from celldiff.diffusion.trajectory import SPACINGS, randn, resampling_walk, timestep_sequence
from celldiff.nets.unet import UNet


# --------------------------------------------------------------------------- oracle models
def gaussian_oracle(schedule: NoiseSchedule, mu: float, std: float) -> ModelFn:
    """Exact E[eps | x_t] for data x_0 ~ N(mu, std^2) per pixel (std = 0: point mass at mu)."""

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
        var = ab * std**2 + 1 - ab
        return ((1 - ab).sqrt() * (x_t.double() - ab.sqrt() * mu) / var).float()

    return model_fn


def two_mode_oracle(schedule: NoiseSchedule, modes: Tensor) -> ModelFn:
    """Exact E[eps | x_t] for data uniform over the K images ``modes`` (K, C, H, W)."""
    modes = modes.double()

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
        x = x_t.double()
        diff = x[:, None] - ab.sqrt()[:, None] * modes[None]  # (B, K, C, H, W)
        logits = -diff.pow(2).flatten(2).sum(-1) / (2 * (1 - ab.view(-1, 1)))
        weights = logits.softmax(dim=1)[:, :, None, None, None]
        x0_mean = (weights * modes[None]).sum(1)
        return ((x - ab.sqrt() * x0_mean) / (1 - ab).sqrt()).float()

    return model_fn


def wiggly_model(x_t: Tensor, t: Tensor) -> Tensor:
    """A per-sample, nonlinear, t-dependent stand-in for a network."""
    return torch.tanh(x_t) + 1e-4 * t.view(-1, 1, 1, 1) * x_t.mean(dim=(1, 2, 3), keepdim=True)


def tiny_unet(seed: int = 0) -> UNet:
    """A tiny U-Net whose zero-initialised layers are randomised so its output is non-trivial."""
    torch.manual_seed(seed)
    net = UNet(
        in_channels=1,
        out_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        image_size=8,
        dropout=0.0,
        num_heads=2,
    )
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net.eval()


# --------------------------------------------------------------------------- timesteps & noise
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(("T", "S"), [(1000, 50), (1000, 1000), (1000, 7), (100, 1), (10, 3)])
def test_timestep_sequence_properties(spacing: str, T: int, S: int) -> None:
    seq = timestep_sequence(T, S, spacing, NoiseSchedule("cosine", T).alpha_bar)
    assert seq.dtype == torch.long and seq.shape == (S,)
    assert (seq[1:] > seq[:-1]).all()
    assert seq.min() >= 0 and seq.max() <= T - 1
    if S == T:
        assert torch.equal(seq, torch.arange(T))
    if spacing in ("uniform", "trailing", "logsnr"):
        assert seq[-1] == T - 1
    if spacing in ("uniform", "logsnr") and S > 1:
        assert seq[0] == 0


def test_logsnr_spacing_is_uniform_in_log_snr() -> None:
    schedule = NoiseSchedule("linear", 1000)
    ab = schedule.alpha_bar
    lam = 0.5 * (ab.log() - torch.log1p(-ab))
    seq = timestep_sequence(1000, 20, "logsnr", ab)
    assert seq.tolist() == [0, 1, 4, 10, 19, 35, 61, 103, 166, 253, 353, 454, 546, 629, 704, 772, 834, 893, 947, 999]
    target = torch.linspace(lam[0].item(), lam[-1].item(), 20, dtype=torch.float64)  # lambda(T-1) > LOGSNR_MIN
    # Each point is the integer timestep nearest its target: within half a timestep's lambda step.
    local_step = (lam[(seq - 1).clamp(min=0)] - lam[(seq + 1).clamp(max=999)]).abs()
    assert ((lam[seq] - target).abs() <= local_step / 2 + 1e-12).all()
    with pytest.raises(ValueError, match="alpha_bar"):
        timestep_sequence(1000, 20, "logsnr")


def test_timestep_sequence_errors() -> None:
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            timestep_sequence(1000, steps)
    with pytest.raises(ValueError, match="uniform"):
        timestep_sequence(1000, 10, "log")


def test_randn_per_sample_generators() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    noise = randn((3, 2, 4, 4), gens)
    for i, seed in enumerate((5, 6, 7)):
        expected = torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[i], expected)
    with pytest.raises(ValueError, match="generators"):
        randn((2, 1), [torch.Generator()])


def test_resampling_walk() -> None:
    assert resampling_walk(4) == [3, 2, 1, 0, -1]
    assert resampling_walk(4, jump=1, times=2) == [3, 2, 3, 2, 1, 2, 1, 0, 1, 0, -1]
    walk = resampling_walk(10, jump=2, times=3)
    moves = [b - a for a, b in pairwise(walk)]
    assert walk[0] == 9 and walk[-1] == -1 and set(moves) == {-1, 2}
    # jump points {0, 2, 4, 6}, each re-doing 2 steps twice more: 10 + 4 * 2 * 2 reverse steps
    assert moves.count(-1) == 26


# --------------------------------------------------------------------------- correctness
def test_ddpm_full_steps_is_ho_algorithm_2() -> None:
    T = 50
    schedule = NoiseSchedule("linear", T)
    shape = (2, 1, 4, 4)
    out = sample(
        wiggly_model,
        schedule,
        shape,
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    # Hand-written Alg. 2 with sigma_t^2 = beta_tilde_t, same draw order.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).double()
    b, a, ab = schedule.betas, schedule.alphas, schedule.alpha_bar
    for t in reversed(range(T)):
        eps = wiggly_model(x.float(), torch.full((2,), t)).double()
        mean = (x - b[t] / (1 - ab[t]).sqrt() * eps) / a[t].sqrt()  # DDPM eq. 11
        if t > 0:
            z = torch.randn(shape, generator=gen).double()
            x = mean + schedule.posterior_variance[t].sqrt() * z
        else:
            x = mean
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float(), rtol=0, atol=1e-4)


def test_ddim_eta_one_matches_ddpm() -> None:
    schedule = NoiseSchedule("linear", 1000)
    kwargs = dict(steps=20, x_T=torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)))
    ddpm = sample(
        wiggly_model,
        schedule,
        (2, 1, 4, 4),
        method="ddpm",
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    ddim = sample(
        wiggly_model,
        schedule,
        (2, 1, 4, 4),
        method="ddim",
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-4)


def test_single_steps_final_step_returns_x0() -> None:
    x_t, eps = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    ab = 0.3
    x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    for step in (ddpm_step, ddim_step):
        x_prev, x0_pred = step(x_t, eps, ab, 1.0, None, clip_denoised=False)
        torch.testing.assert_close(x_prev, x0)
        torch.testing.assert_close(x0_pred, x0)
    # DPM-Solver++'s last step (to sigma = 0) is first order: exactly the data prediction.
    assert dpmsolver_step(x_t, x0, ab, 1.0) is x0
    assert dpmsolver_step(x_t, x0, ab, 1.0, torch.zeros_like(x0), 0.1) is x0


@pytest.mark.parametrize("clip", [False, True])
def test_dpmsolver_first_order_step_is_ddim(clip: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for ab_s, ab_t in ((0.02, 0.1), (0.5, 0.9), (0.97, 0.9999)):
        ddim, x0 = ddim_step(x_t, eps, ab_s, ab_t, None, clip_denoised=clip)
        torch.testing.assert_close(dpmsolver_step(x_t, x0, ab_s, ab_t), ddim, rtol=0, atol=1e-12)


def test_dpmsolver_second_order_step_is_algorithm_2() -> None:
    # Lu et al. 2022, Alg. 2 (DPM-Solver++(2M)), written out with h = lambda_t - lambda_s, r = h_prev / h.
    g = torch.Generator().manual_seed(1)
    x_s, x0_s, x0_r = (torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ab_r, ab_s, ab_t = 0.05, 0.3, 0.8
    lam = lambda ab: math.log(math.sqrt(ab) / math.sqrt(1 - ab))  # noqa: E731
    h, h_prev = lam(ab_t) - lam(ab_s), lam(ab_s) - lam(ab_r)
    d = (1 + 1 / (2 * (h_prev / h))) * x0_s - 1 / (2 * (h_prev / h)) * x0_r
    expected = math.sqrt(1 - ab_t) / math.sqrt(1 - ab_s) * x_s - math.sqrt(ab_t) * (math.exp(-h) - 1) * d
    torch.testing.assert_close(dpmsolver_step(x_s, x0_s, ab_s, ab_t, x0_r, ab_r), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "steps"),
    [("ddpm", None), ("ddpm", 100), ("ddim", 50), ("ddim", None), ("dpmsolver", 20), ("dpmsolver", 5)],
)
@pytest.mark.parametrize("clip", [True, False])
def test_point_mass_recovered(method: str, steps: int | None, clip: bool) -> None:
    schedule = NoiseSchedule("linear", 1000)
    c = 0.37
    out = sample(
        gaussian_oracle(schedule, c, 0.0),
        schedule,
        (2, 3, 4, 4),
        method=method,
        steps=steps,
        clip_denoised=clip,
        generator=torch.Generator().manual_seed(0),
    )
    assert (out - c).abs().max() < 1e-3


# Few-step samplers under-disperse even with the exact eps: the fixed-small variance omits the
# uncertainty of x_0 given x_t, which grows with the jump (measured std for cosine, data std 0.2:
# DDPM 100 steps 0.183, DDIM 50 steps 0.188; both -> 0.200 as steps -> T). A wrongly respaced
# schedule would miss the mean and std by far more than these tolerances.
@pytest.mark.parametrize(
    ("method", "steps", "eta", "std_rel_tol"),
    [
        ("ddpm", None, 0.0, 0.03),
        ("ddpm", 100, 0.0, 0.12),
        ("ddim", 50, 0.0, 0.08),
    ],
)
def test_gaussian_data_distribution_recovered(
    method: str, steps: int | None, eta: float, std_rel_tol: float
) -> None:
    schedule = NoiseSchedule("cosine", 1000)
    mu, std, n = 0.3, 0.2, 8192
    out = sample(
        gaussian_oracle(schedule, mu, std),
        schedule,
        (n, 1, 1, 1),
        method=method,
        steps=steps,
        eta=eta,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(std, rel=std_rel_tol)


def exact_gaussian_flow(schedule: NoiseSchedule, x_T: Tensor, mu: float, std: float) -> Tensor:
    """The probability-flow ODE's own map x_T -> x_0 for data N(mu, std^2) per pixel.

    The marginals are N(sqrt(ab) mu, ab std^2 + 1 - ab) and the flow of independent pixels keeps each
    pixel's standardised value, so x_0 = mu + std (x_T - sqrt(ab_T) mu) / sqrt(ab_T std^2 + 1 - ab_T).
    """
    ab_T = schedule.alpha_bar[-1].item()
    return mu + std * (x_T.double() - math.sqrt(ab_T) * mu) / math.sqrt(ab_T * std**2 + 1 - ab_T)


# Deterministic samplers against the exact flow map of the same x_T: no sampling noise, only the
# discretisation error. Measured max |error| over 4096 pixels (mu 0.3): DPM-Solver++ 20 steps 0.0115
# (linear) / 0.0122 (cosine) at std 0.2, 0.030 / 0.032 at std 0.5; 50 steps 0.0008 / 0.0017 and
# 0.0045 / 0.0053; DDIM 50 steps 0.099 / 0.052 and 0.115 / 0.063. The bounds are these with ~30 %
# headroom; a wrongly respaced or wrongly ordered solver misses them by far.
@pytest.mark.parametrize(
    ("schedule_name", "method", "steps", "std", "bound"),
    [
        ("linear", "dpmsolver", 20, 0.2, 0.015),
        ("cosine", "dpmsolver", 20, 0.2, 0.016),
        ("linear", "dpmsolver", 20, 0.5, 0.04),
        ("linear", "dpmsolver", 50, 0.2, 0.0012),
        ("cosine", "dpmsolver", 50, 0.5, 0.007),
        ("linear", "ddim", 50, 0.2, 0.13),
        ("cosine", "ddim", 50, 0.2, 0.07),
    ],
)
def test_deterministic_samplers_follow_the_exact_gaussian_flow(
    schedule_name: str, method: str, steps: int, std: float, bound: float
) -> None:
    schedule, mu = NoiseSchedule(schedule_name, 1000), 0.3
    x_T = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample(gaussian_oracle(schedule, mu, std), schedule, x_T.shape, method=method, steps=steps, x_T=x_T,
                 clip_denoised=False)  # fmt: skip
    assert (out.double() - exact_gaussian_flow(schedule, x_T, mu, std)).abs().max().item() < bound


@pytest.mark.parametrize(("schedule_name", "std"), [("linear", 0.2), ("linear", 0.5), ("cosine", 0.5)])
def test_dpmsolver_is_second_order_ddim_first_order(schedule_name: str, std: float) -> None:
    # Doubling the steps divides the error by ~4 for a second-order solver and by ~2 for DDIM
    # (measured: DPM-Solver++ 25 -> 50 steps 3.9-7.5x, DDIM 50 -> 100 steps 1.9-2.0x).
    x_T = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    schedule = NoiseSchedule(schedule_name, 1000)
    exact = exact_gaussian_flow(schedule, x_T, 0.3, std)

    def error(method: str, steps: int) -> float:
        out = sample(gaussian_oracle(schedule, 0.3, std), schedule, x_T.shape, method=method, steps=steps,
                     x_T=x_T, clip_denoised=False, dtype=torch.float64)  # fmt: skip
        return (out - exact).abs().max().item()

    assert error("dpmsolver", 25) / error("dpmsolver", 50) > 3.5
    assert 1.7 < error("ddim", 50) / error("ddim", 100) < 2.3


# The population moments of n = 65536 pixels against N(mu, std^2): tolerance = 4 standard errors
# (std / sqrt(n) for the mean, std / sqrt(2 n) for the std; 4 SE = 0.0031 and 0.0022 at std 0.2) plus each
# sampler's discretisation bias, bounded by the flow test above (deterministic) or measured (DDPM):
# DPM-Solver++ 20 steps std +0.003 (1.4 %), DDIM 50 std -0.025 (linear) / -0.013 (cosine), DDPM 1000
# std -0.004 / -0.002 (the fixed-small variance); the means are biased by < 3e-4 (x_T ~ N(0, I) at
# alpha_bar_T > 0 shifts them by sqrt(ab_T) mu std ~ 4e-4 for the linear schedule).
@pytest.mark.parametrize(
    ("schedule_name", "method", "steps", "std_bias"),
    [
        ("linear", "dpmsolver", 20, 0.004),
        ("cosine", "dpmsolver", 20, 0.004),
        ("linear", "ddim", 50, 0.03),
        ("cosine", "ddim", 50, 0.016),
        ("linear", "ddpm", None, 0.006),
    ],
)
def test_gaussian_data_moments_within_derived_tolerance(
    schedule_name: str, method: str, steps: int | None, std_bias: float
) -> None:
    schedule, mu, std, n = NoiseSchedule(schedule_name, 1000), 0.3, 0.2, 65536
    out = sample(gaussian_oracle(schedule, mu, std), schedule, (1, 1, 256, 256), method=method, steps=steps,
                 clip_denoised=False, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert abs(out.mean().item() - mu) < 4 * std / math.sqrt(n) + 1e-3
    assert abs(out.std().item() - std) < 4 * std / math.sqrt(2 * n) + std_bias


# --------------------------------------------------------------------------- reproducibility
def test_same_seed_same_images_different_seed_different() -> None:
    net = tiny_unet()
    schedule = NoiseSchedule("cosine", 10)

    def run(seed: int) -> Tensor:
        return sample(
            lambda x, t: net(x, t),
            schedule,
            (2, 1, 8, 8),
            steps=5,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmsolver"])
def test_per_sample_generators_independent_of_batch(method: str) -> None:
    schedule = NoiseSchedule("linear", 100)

    def run(seeds: list[int]) -> Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(
            wiggly_model,
            schedule,
            (len(seeds), 2, 4, 4),
            method=method,
            steps=10,
            eta=0.5,
            generator=gens,
        )

    alone = run([42])
    assert torch.equal(run([1, 42, 3])[1], alone[0])
    assert torch.equal(run([42, 9])[0], alone[0])


def test_ddim_eta_zero_deterministic_given_x_T() -> None:
    schedule = NoiseSchedule("linear", 100)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample(
        wiggly_model,
        schedule,
        x_T.shape,
        method="ddim",
        steps=10,
        x_T=x_T,
        generator=torch.Generator().manual_seed(1),
    )
    b = sample(
        wiggly_model,
        schedule,
        x_T.shape,
        method="ddim",
        steps=10,
        x_T=x_T,
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- inpainting
def _inpainting_problem(batch: int = 8) -> tuple[NoiseSchedule, ModelFn, Tensor, Tensor]:
    schedule = NoiseSchedule("linear", 1000)
    modes = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), -0.5)])
    known = torch.full((batch, 1, 8, 8), 0.5)
    missing = torch.zeros(batch, 1, 8, 8)
    missing[..., 4:] = 1.0  # right half unknown
    return schedule, two_mode_oracle(schedule, modes), known, missing


@pytest.mark.parametrize(
    ("method", "jump", "times"),
    [("ddpm", 1, 1), ("ddim", 1, 1), ("ddpm", 2, 3), ("ddim", 1, 2), ("dpmsolver", 1, 1), ("dpmsolver", 2, 3)],
)
def test_inpainting_keeps_known_and_harmonises(method: str, jump: int, times: int) -> None:
    schedule, oracle, known, missing = _inpainting_problem()
    known = known + 0.01 * torch.randn(known.shape, generator=torch.Generator().manual_seed(9))
    calls = []
    out = sample(
        oracle,
        schedule,
        known.shape,
        method=method,
        steps=25,
        known=known,
        missing_mask=missing,
        resample_jump=jump,
        resample_times=times,
        generator=torch.Generator().manual_seed(0),
        callback=calls.append,
    )
    keep = missing == 0
    assert torch.equal(out[keep.expand_as(out)], known[keep.expand_as(known)])
    assert torch.isfinite(out).all()
    # The only data mode consistent with the known half is the +0.5 image.
    assert (out[..., 4:] - 0.5).abs().max() < 0.05
    walk = resampling_walk(25, jump, times)
    assert len(calls) == sum(1 for a, b in pairwise(walk) if b < a)  # one call per model eval


@pytest.mark.parametrize("resample_times", [1, 2])
def test_dpmsolver_inpainting_depends_only_on_each_seed(resample_times: int) -> None:
    # Replacement inpainting re-noises the known region from the per-sample generators: image i is
    # the same alone, in a batch of 3, and in another order; every known pixel is the observation.
    schedule = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(4)
    known = torch.rand(3, 2, 8, 8, generator=g) * 2 - 1
    missing = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    seeds = [101, 202, 303]

    def run(order: list[int]) -> Tensor:
        generators = [torch.Generator().manual_seed(seeds[i]) for i in order]
        return sample(wiggly_model, schedule, (len(order), 2, 8, 8), method="dpmsolver", steps=12,
                      known=known[order], missing_mask=missing[order], resample_jump=2,
                      resample_times=resample_times, generator=generators)  # fmt: skip

    # Were the known region's re-noising draws taken from the global RNG, these would differ.
    batch, permuted, alone = run([0, 1, 2]), run([2, 0, 1]), run([1])
    assert torch.equal(permuted, batch[[2, 0, 1]])
    assert torch.equal(alone[0], batch[1])
    keep = (missing == 0).expand_as(known)
    assert torch.equal(batch[keep], known[keep])
    assert not torch.allclose(batch[~keep], known[~keep])  # the missing region is generated


def test_unconditional_two_mode_hits_both_modes() -> None:
    schedule, oracle, _, _ = _inpainting_problem()
    out = sample(
        oracle, schedule, (16, 1, 8, 8), steps=25, generator=torch.Generator().manual_seed(0)
    )
    means = out.mean(dim=(1, 2, 3))
    assert ((means - 0.5).abs() < 0.05).any() and ((means + 0.5).abs() < 0.05).any()


def test_inpainting_argument_errors() -> None:
    schedule, oracle, known, missing = _inpainting_problem(2)
    with pytest.raises(ValueError, match="both"):
        sample(oracle, schedule, known.shape, known=known)
    with pytest.raises(ValueError, match="missing_mask"):
        sample(oracle, schedule, known.shape, known=known, missing_mask=missing[:, :, :4])
    with pytest.raises(ValueError, match="resample_jump"):
        sample(oracle, schedule, known.shape, steps=5, resample_jump=5, resample_times=2)


# --------------------------------------------------------------------------- misc behaviour
def test_callback_called_every_step() -> None:
    schedule = NoiseSchedule("linear", 100)
    for method, steps in (("ddpm", None), ("ddpm", 10), ("ddim", 7), ("dpmsolver", 7)):
        calls: list[dict] = []
        sample(
            wiggly_model,
            schedule,
            (1, 1, 2, 2),
            method=method,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
            callback=calls.append,
        )
        n = steps or 100
        assert [c["i"] for c in calls] == list(range(n))
        expected = timestep_sequence(100, n, SAMPLERS[method].spacing, schedule.alpha_bar)
        assert [c["t"] for c in calls] == expected.flip(0).tolist()
        assert all(
            c["x0_pred"].shape == (1, 1, 2, 2) and c["x_t"].dtype == torch.float32 for c in calls
        )
        assert calls[-1]["num_steps"] == n


def test_autocast_bf16_returns_float32() -> None:
    net = tiny_unet()
    schedule = NoiseSchedule("cosine", 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample(
            lambda x, t: net(x, t),
            schedule,
            (2, 1, 8, 8),
            method="ddim",
            steps=3,
            generator=torch.Generator().manual_seed(0),
        )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # A low-precision model output is cast up as well.
    for method in SAMPLERS:
        out = sample(lambda x, t: torch.zeros_like(x, dtype=torch.bfloat16), schedule, (1, 1, 2, 2), method=method)
        assert out.dtype == torch.float32


def test_bad_arguments() -> None:
    schedule = NoiseSchedule("cosine", 10)
    with pytest.raises(ValueError, match="ddpm, ddim, dpmsolver"):
        sample(wiggly_model, schedule, (1, 1, 2, 2), method="euler")
    with pytest.raises(ValueError, match="x_T"):
        sample(wiggly_model, schedule, (1, 1, 2, 2), x_T=torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="steps"):
        sample(wiggly_model, schedule, (1, 1, 2, 2), steps=11)
