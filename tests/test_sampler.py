"""Behaviour of the reverse-process sampler (celldiff.sampler) with oracle and tiny models."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from celldiff.sampler import (
    SPACINGS,
    ModelFn,
    ddim_step,
    ddpm_step,
    guided_model_fn,
    randn,
    resampling_walk,
    sample,
    timestep_sequence,
)
from celldiff.schedule import NoiseSchedule
from celldiff.unet import UNet


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
    seq = timestep_sequence(T, S, spacing)
    assert seq.dtype == torch.long and seq.shape == (S,)
    assert (seq[1:] > seq[:-1]).all()
    assert seq.min() >= 0 and seq.max() <= T - 1
    if S == T:
        assert torch.equal(seq, torch.arange(T))
    if spacing in ("uniform", "trailing"):
        assert seq[-1] == T - 1
    if spacing == "uniform" and S > 1:
        assert seq[0] == 0


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


@pytest.mark.parametrize(
    ("method", "steps"), [("ddpm", None), ("ddpm", 100), ("ddim", 50), ("ddim", None)]
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


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
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
    ("method", "jump", "times"), [("ddpm", 1, 1), ("ddim", 1, 1), ("ddpm", 2, 3), ("ddim", 1, 2)]
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
    for method, steps in (("ddpm", None), ("ddpm", 10), ("ddim", 7)):
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
        assert [c["t"] for c in calls] == timestep_sequence(100, n).flip(0).tolist()
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
    out = sample(lambda x, t: torch.zeros_like(x, dtype=torch.bfloat16), schedule, (1, 1, 2, 2))
    assert out.dtype == torch.float32


def test_guided_model_fn_exact_cases() -> None:
    def cond(x: Tensor, t: Tensor) -> Tensor:
        return x * 3.0 + 0.1

    def uncond(x: Tensor, t: Tensor) -> Tensor:
        return x * -1.0 + 0.7

    x, t = torch.randn(2, 1, 3, 3), torch.tensor([4, 5])
    assert torch.equal(guided_model_fn(cond, uncond, 1.0)(x, t), cond(x, t))
    assert torch.equal(guided_model_fn(cond, uncond, 0.0)(x, t), uncond(x, t))
    guided = guided_model_fn(cond, uncond, 2.5)(x, t)
    torch.testing.assert_close(guided, uncond(x, t) + 2.5 * (cond(x, t) - uncond(x, t)))


def test_bad_arguments() -> None:
    schedule = NoiseSchedule("cosine", 10)
    with pytest.raises(ValueError, match="ddpm, ddim"):
        sample(wiggly_model, schedule, (1, 1, 2, 2), method="euler")
    with pytest.raises(ValueError, match="x_T"):
        sample(wiggly_model, schedule, (1, 1, 2, 2), x_T=torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="steps"):
        sample(wiggly_model, schedule, (1, 1, 2, 2), steps=11)
