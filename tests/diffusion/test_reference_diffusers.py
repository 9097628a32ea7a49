"""celldiff's DDPM, DDIM and DPM-Solver++ loops against diffusers' schedulers, an independent implementation.

Same x_T, same model_fn, same noise (the same per-sample generators, drawn in the same order), float64
on both sides: x after the whole loop must agree to float round-off. The schedulers are built from
arguments only (nothing is downloaded). diffusers computes its schedule in float32 (its betas are
float32 tensors); that schedule is checked against celldiff's below, and then celldiff's float64
alpha_bar is given to the scheduler, so that the comparison measures the sampler alone.
diffusers' DPM-Solver step also rounds x to float32 on entry (``sample.to(torch.float32)``), which
bounds that agreement at ~1e-7.

diffusers is a dev-only dependency (``pip install -e .[dev]``); without it these tests are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from celldiff.diffusion.samplers import sample
from celldiff.diffusion.schedule import NoiseSchedule
from celldiff.diffusion.trajectory import randn, timestep_sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub (nothing here would)
diffusers = pytest.importorskip(
    "diffusers", reason="diffusers (a dev extra: pip install -e .[dev]) is needed for the reference checks"
)

T = 1000
SHAPE = (3, 2, 8, 8)
SEEDS = (11, 12, 13)
# Measured (pytest -s prints them): DDPM and DDIM agree to ~2e-15, DPM-Solver++ to ~5e-7 at |x| ~ 1
# (diffusers rounds x to float32 in every DPM-Solver step).
ATOL_FLOAT64 = 1e-12
ATOL_DPMSOLVER = 1e-5


def make_model_fn(schedule: NoiseSchedule):
    """A nonlinear, per-sample, t-dependent stand-in for a network, dtype-preserving: the exact eps of
    data N(0.1, 0.5^2) per pixel plus a perturbation, so that samples stay O(1) without clipping."""
    alpha_bar = schedule.alpha_bar

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        ab = alpha_bar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        exact = (1 - ab).sqrt() * (x_t - ab.sqrt() * 0.1) / (ab * 0.25 + 1 - ab)
        tt = t.to(x_t.dtype).view(-1, 1, 1, 1) / T
        return exact + 0.2 * torch.tanh(2 * x_t) * torch.sin(6 * tt) + 0.1 * x_t.mean(dim=(1, 2, 3), keepdim=True)

    return model_fn


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def with_float64_schedule(scheduler, schedule: NoiseSchedule):
    """Give ``scheduler`` celldiff's float64 alpha_bar (diffusers' own is float32, see test below)."""
    scheduler.alphas_cumprod = schedule.alpha_bar.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.betas = schedule.betas.clone()
    return scheduler


def check(ours: Tensor, theirs: Tensor, label: str, atol: float = ATOL_FLOAT64) -> None:
    assert ours.dtype == theirs.dtype == torch.float64
    err = (ours - theirs).abs().max().item()
    print(f"{label}: max |celldiff - diffusers| = {err:.2e} (max |x| = {theirs.abs().max().item():.2f})")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


@pytest.mark.parametrize(("name", "theirs"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_beta_schedules_match_diffusers(name: str, theirs: str) -> None:
    from diffusers import DDPMScheduler

    ours = NoiseSchedule(name, T)
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs)
    torch.testing.assert_close(scheduler.betas.double(), ours.betas, rtol=1e-5, atol=1e-7)  # float32 vs float64
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours.alpha_bar, rtol=5e-5, atol=1e-7)


# --------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize(
    ("steps", "spacing", "clip"),
    [(None, "uniform", False), (None, "uniform", True), (50, "leading", True), (50, "uniform", False)],
)
def test_ddpm_matches_diffusers_ddpm_scheduler(steps: int | None, spacing: str, clip: bool) -> None:
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule("linear", T)
    model_fn = make_model_fn(schedule)
    ours = sample(model_fn, schedule, SHAPE, method="ddpm", steps=steps, spacing=spacing, clip_denoised=clip,
                  generator=generators(), dtype=torch.float64)  # fmt: skip

    scheduler = with_float64_schedule(
        DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_small", clip_sample=clip,
                      clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0),  # fmt: skip
        schedule,
    )
    if steps is not None and spacing == "leading":
        scheduler.set_timesteps(steps)  # diffusers' own "leading" spacing
    elif steps is not None:
        scheduler.set_timesteps(timesteps=timestep_sequence(T, steps, spacing).flip(0).tolist())
    expected_t = timestep_sequence(T, steps or T, spacing).flip(0)
    assert torch.equal(scheduler.timesteps, expected_t)
    gens = generators()
    x = randn(SHAPE, gens, dtype=torch.float64)
    for t in scheduler.timesteps:
        eps = model_fn(x, torch.full((SHAPE[0],), int(t)))
        x = scheduler.step(eps, int(t), x, generator=gens).prev_sample
    check(ours, x, f"DDPM steps={steps or T} {spacing} clip={clip}")


# --------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize(
    ("spacing", "eta", "clip"),
    [("leading", 0.0, False), ("trailing", 0.0, True), ("leading", 0.5, True), ("trailing", 1.0, False)],
)
def test_ddim_matches_diffusers_ddim_scheduler(spacing: str, eta: float, clip: bool) -> None:
    # diffusers' DDIM steps to t - T // S, i.e. the next timestep of "leading", and of "trailing" when S divides T.
    from diffusers import DDIMScheduler

    steps = 50
    schedule = NoiseSchedule("linear", T)
    model_fn = make_model_fn(schedule)
    ours = sample(model_fn, schedule, SHAPE, method="ddim", steps=steps, eta=eta, spacing=spacing,
                  clip_denoised=clip, generator=generators(), dtype=torch.float64)  # fmt: skip

    scheduler = with_float64_schedule(
        DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip, clip_sample_range=1.0,
                      set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing),  # fmt: skip
        schedule,
    )
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, timestep_sequence(T, steps, spacing).flip(0))
    gens = generators()
    x = randn(SHAPE, gens, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        eps = model_fn(x, torch.full((SHAPE[0],), int(t)))
        last = i == len(scheduler.timesteps) - 1
        noise = randn(SHAPE, gens, dtype=torch.float64) if eta > 0 and not last else None
        # celldiff re-derives eps from the clipped x_0 (improved-diffusion): use_clipped_model_output.
        x = scheduler.step(eps, int(t), x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
    check(ours, x, f"DDIM {spacing} eta={eta} clip={clip}")


# --------------------------------------------------------------------------- DPM-Solver++
def _dpmsolver(schedule: NoiseSchedule, beta_schedule: str, clip: bool, spacing: str):
    from diffusers import DPMSolverMultistepScheduler

    kwargs = dict(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        prediction_type="epsilon",
        # thresholding with sample_max_value 1 is static clipping of x_0 to [-1, 1] (celldiff's clip_denoised)
        thresholding=clip,
        sample_max_value=1.0,
        timestep_spacing="trailing" if spacing == "trailing" else "linspace",
    )
    return with_float64_schedule(DPMSolverMultistepScheduler(**kwargs), schedule)


@pytest.mark.parametrize(
    ("schedule_name", "spacing", "steps", "clip"),
    [
        ("linear", "logsnr", 20, False),
        ("linear", "logsnr", 20, True),
        ("cosine", "logsnr", 15, False),
        ("linear", "trailing", 20, True),
        ("linear", "uniform", 10, False),
        ("linear", "logsnr", 1, False),
        ("linear", "logsnr", 2, False),
    ],
)
def test_dpmsolver_matches_diffusers_dpmsolver_multistep(
    schedule_name: str, spacing: str, steps: int, clip: bool
) -> None:
    schedule = NoiseSchedule(schedule_name, T)
    model_fn = make_model_fn(schedule)
    ours = sample(model_fn, schedule, SHAPE, method="dpmsolver", steps=steps, spacing=spacing, clip_denoised=clip,
                  generator=generators(), dtype=torch.float64)  # fmt: skip

    scheduler = _dpmsolver(schedule, "linear" if schedule_name == "linear" else "squaredcos_cap_v2", clip, spacing)
    expected_t = timestep_sequence(T, steps, spacing, schedule.alpha_bar).flip(0)
    if spacing == "trailing":
        scheduler.set_timesteps(steps)  # diffusers' own "trailing" spacing
    else:  # integer timesteps given: diffusers takes their sigmas from its alpha_bar
        scheduler.set_timesteps(timesteps=expected_t.tolist())
    assert torch.equal(scheduler.timesteps, expected_t)
    # set_timesteps stores sigmas in float32; the same sigmas in float64 (plus the final 0).
    ab = schedule.alpha_bar[expected_t]
    scheduler.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x = randn(SHAPE, generators(), dtype=torch.float64)
    for t in scheduler.timesteps:
        eps = model_fn(x, torch.full((SHAPE[0],), int(t)))
        x = scheduler.step(eps, int(t), x).prev_sample
    check(ours, x, f"DPM-Solver++ 2M {schedule_name} {spacing} {steps} steps clip={clip}", ATOL_DPMSOLVER)


def test_dpmsolver_float32_against_stock_diffusers() -> None:
    """celldiff in float32 against diffusers with nothing replaced (its float32 schedule and sigmas)."""
    schedule = NoiseSchedule("linear", T)
    steps = 20
    model_fn = make_model_fn(schedule)
    ours = sample(model_fn, schedule, SHAPE, method="dpmsolver", steps=steps, generator=generators())
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", algorithm_type="dpmsolver++",
                                            solver_order=2, lower_order_final=True, thresholding=True,
                                            sample_max_value=1.0)  # fmt: skip
    scheduler.set_timesteps(timesteps=timestep_sequence(T, steps, "logsnr", schedule.alpha_bar).flip(0).tolist())
    x = randn(SHAPE, generators())
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, torch.full((SHAPE[0],), int(t))), int(t), x).prev_sample
    err = (ours - x).abs().max().item()
    print(f"DPM-Solver++ float32, stock diffusers schedule: max |diff| = {err:.2e}")
    assert ours.dtype == x.dtype == torch.float32
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)  # float32 schedules differ at ~1e-6 relative

