"""Reverse-process samplers: one function per algorithm, one registry, and the walk that runs them.

An algorithm is one function ``step(run, x_t, eps, alpha_bar, alpha_bar_prev) -> (x_prev, x0_pred)``:
:func:`ddpm` (Ho et al. 2020, Alg. 2), :func:`ddim` (Song et al. 2021, eq. 12), :func:`dpmsolver`
(DPM-Solver++ 2M, Lu et al. 2022, Alg. 2). :data:`SAMPLERS` maps each name to it and its default steps
and spacing: the one list of sampler names, which the module, the callbacks, the CLI and evaluate read.
Adding a sampler is one function here and its line in ``SAMPLERS``.

:func:`sample` prepares a :class:`SamplingRun` and hands the algorithm to :func:`repaint_walk`, which calls
the model, replaces the known region (inpainting) and walks RePaint's resampling schedule (plain sampling
is the walk without jumps). The sampler never owns the network: it receives a ``model_fn(x_t, t) -> eps``
that closes over the conditioning (``celldiff.diffusion.denoiser``). x_0 and eps are converted by the
schedule's own functions (``celldiff.diffusion.schedule``).

Precision: x_t and all update arithmetic are float32 (``dtype=torch.float64`` for reference checks);
per-step coefficients are float64 (Python floats) from the schedule's float64 ``alpha_bar``, and the model
output is cast to float32, so an autocast region around the call only affects the network.

Random draws, in order (so a run is reproducible from its generator(s)): x_T (unless given); then per
reverse step the step noise (DDPM when not at the last step; DDIM only if eta > 0; DPM-Solver++ never),
then the noise for the known region (inpainting, not at the last step); per RePaint jump the re-noising noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from celldiff.diffusion.schedule import (
    NoiseSchedule,
    eps_from_x0,
    log_snr,
    q_posterior_mean_variance,
    x0_from_eps,
)
from celldiff.diffusion.trajectory import Generators, SamplingRun, inpainting_inputs, resampling_walk, timestep_sequence

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(x_t: float32 (B, C, H, W), t: long (B,)) -> eps (B, C, H, W)``."""


# --------------------------------------------------------------------------- single steps (the maths)
def _clip(x0: Tensor, clip_denoised: bool) -> Tensor:
    return x0.clamp(-1.0, 1.0) if clip_denoised else x0


def ddpm_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    noise: Tensor | None,
    *,
    clip_denoised: bool = True,
) -> tuple[Tensor, Tensor]:
    """One ancestral step x_t -> x_{t'} (t' < t) with the fixed-small variance of Ho et al.

    For a respaced sequence the step's beta is 1 - alpha_bar_t / alpha_bar_{t'} (improved-diffusion
    respacing); with consecutive timesteps this is the schedule's own beta_t. The mean is the
    posterior mean of DDPM eq. 7 at the predicted x_0 (:func:`q_posterior_mean_variance`), which
    without clipping equals eq. 11's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps);
    sigma^2 = beta_tilde_t.

    Args:
        x_t: Current sample, float32 (B, C, H, W).
        eps: Predicted noise, float32 (B, C, H, W).
        alpha_bar_t: alpha_bar at the current timestep.
        alpha_bar_prev: alpha_bar at the next (smaller) timestep; 1.0 at the last step.
        noise: Standard normal (B, C, H, W), or None for no noise (the last step: beta_tilde = 0).
        clip_denoised: Clip the predicted x_0 to [-1, 1].

    Returns:
        ``(x_prev, x0_pred)``, both float32 (B, C, H, W).
    """
    x0 = _clip(x0_from_eps(x_t, eps, alpha_bar_t), clip_denoised)
    x_prev, variance = q_posterior_mean_variance(x0, x_t, alpha_bar_t, alpha_bar_prev)
    if noise is not None and variance > 0.0:
        x_prev = x_prev + math.sqrt(variance) * noise
    return x_prev, x0


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    noise: Tensor | None,
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12, with sigma from eq. 16).

    x_{t'} = sqrt(alpha_bar_{t'}) x0_pred + sqrt(1 - alpha_bar_{t'} - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_{t'}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t'}), ab = alpha_bar.
    eta = 0 is deterministic; eta = 1 matches the DDPM step. When x_0 is clipped, eps is
    re-derived from the clipped x_0 so the two stay consistent (as improved-diffusion does).

    Args:
        x_t: Current sample, float32 (B, C, H, W).
        eps: Predicted noise, float32 (B, C, H, W).
        alpha_bar_t: alpha_bar at the current timestep.
        alpha_bar_prev: alpha_bar at the next (smaller) timestep; 1.0 at the last step.
        noise: Standard normal (B, C, H, W); may be None when eta = 0 or at the last step.
        eta: Stochasticity, >= 0.
        clip_denoised: Clip the predicted x_0 to [-1, 1].

    Returns:
        ``(x_prev, x0_pred)``, both float32 (B, C, H, W).
    """
    x0 = _clip(x0_from_eps(x_t, eps, alpha_bar_t), clip_denoised)
    if clip_denoised:
        eps = eps_from_x0(x_t, x0, alpha_bar_t)
    sigma = (
        eta
        * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t))
        * math.sqrt(1.0 - alpha_bar_t / alpha_bar_prev)
    )
    direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def dpmsolver_step(
    x_s: Tensor,
    x0_s: Tensor,
    alpha_bar_s: float,
    alpha_bar_t: float,
    x0_r: Tensor | None = None,
    alpha_bar_r: float | None = None,
) -> Tensor:
    """One DPM-Solver++ step s -> t (t < s) in data prediction (Lu et al. 2022, Alg. 2, "2M").

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and
    h = lambda_t - lambda_s, the first-order step (``x0_r`` None) is
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s, i.e. DDIM (eta = 0) with eps
    re-derived from x0_s. The multistep second-order step uses the data prediction x0_r of the
    previous (noisier) point r: with r_0 = (lambda_s - lambda_r) / h and
    D = x0_s + (x0_s - x0_r) / (2 r_0), x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D.
    alpha_bar_t = 1 (the clean end, sigma_t = 0, h = inf) returns x0_s: the first-order last step.
    The coefficients are float64 (Python floats); the result has x_s's dtype.

    Args:
        x_s: Current sample (B, C, H, W).
        x0_s: Data prediction at s (possibly clipped), same shape.
        alpha_bar_s: alpha_bar at the current timestep s.
        alpha_bar_t: alpha_bar at the next (smaller) timestep t; 1.0 for the clean end.
        x0_r: Data prediction at the previous step's timestep r > s, or None for first order.
        alpha_bar_r: alpha_bar at r (needed with ``x0_r``).

    Returns:
        x_t, (B, C, H, W).
    """
    if alpha_bar_t >= 1.0:
        return x0_s
    lambda_s, lambda_t = log_snr(alpha_bar_s), log_snr(alpha_bar_t)
    h = lambda_t - lambda_s
    coef_x = math.sqrt((1.0 - alpha_bar_t) / (1.0 - alpha_bar_s))  # sigma_t / sigma_s
    coef_d = -math.sqrt(alpha_bar_t) * math.expm1(-h)  # alpha_t (1 - e^{-h})
    if x0_r is None:
        return coef_x * x_s + coef_d * x0_s
    if alpha_bar_r is None:
        raise ValueError("dpmsolver_step: a second-order step needs alpha_bar_r with x0_r")
    r0 = (lambda_s - log_snr(alpha_bar_r)) / h
    return coef_x * x_s + coef_d * (x0_s + (0.5 / r0) * (x0_s - x0_r))


# --------------------------------------------------------------------------- the algorithms
Step = Callable[[SamplingRun, Tensor, Tensor, float, float], tuple[Tensor, Tensor]]
"""``step(run, x_t, eps, alpha_bar, alpha_bar_prev) -> (x_prev, x0_pred)``: one reverse step from the
timestep with ``alpha_bar`` to the one with ``alpha_bar_prev`` (1.0 at the last step: the clean end), all
(B, C, H, W) in ``run.dtype``. Random draws come from ``run.randn()``."""


def ddpm(
    run: SamplingRun, x_t: Tensor, eps: Tensor, alpha_bar: float, alpha_bar_prev: float
) -> tuple[Tensor, Tensor]:
    """Ancestral DDPM (Ho et al. 2020, Alg. 2; respaced as improved-diffusion does): :func:`ddpm_step`.

    Draws the step noise unless it is the last step. ``run.eta`` is ignored.
    """
    noise = None if alpha_bar_prev >= 1.0 else run.randn()
    return ddpm_step(x_t, eps, alpha_bar, alpha_bar_prev, noise, clip_denoised=run.clip_denoised)


def ddim(
    run: SamplingRun, x_t: Tensor, eps: Tensor, alpha_bar: float, alpha_bar_prev: float
) -> tuple[Tensor, Tensor]:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity ``run.eta``: :func:`ddim_step`.

    Draws the step noise only if eta > 0 and it is not the last step.
    """
    noise = None if alpha_bar_prev >= 1.0 or run.eta == 0 else run.randn()
    return ddim_step(x_t, eps, alpha_bar, alpha_bar_prev, noise, eta=run.eta, clip_denoised=run.clip_denoised)


def dpmsolver(
    run: SamplingRun, x_t: Tensor, eps: Tensor, alpha_bar: float, alpha_bar_prev: float
) -> tuple[Tensor, Tensor]:
    """DPM-Solver++ 2M (Lu et al. 2022, Alg. 2): multistep second order in data prediction.

    Converts the model's eps to x_0 (clipped to [-1, 1] with ``run.clip_denoised``: static
    thresholding) and calls :func:`dpmsolver_step` with the previous step's x_0 prediction
    (``run.history``). The first step, the step after a RePaint jump (the walk clears the history)
    and the last step (to the clean end, which returns the x_0 prediction) are first order. It is
    deterministic given x_T: it draws nothing itself. ``run.eta`` is ignored.
    """
    x0_pred = _clip(x0_from_eps(x_t, eps, alpha_bar), run.clip_denoised)
    x0_r, alpha_bar_r = run.history if run.history is not None else (None, None)
    x_prev = dpmsolver_step(x_t, x0_pred, alpha_bar, alpha_bar_prev, x0_r, alpha_bar_r)
    run.history = (x0_pred, alpha_bar)
    return x_prev, x0_pred


@dataclass(frozen=True)
class Sampler:
    """A registered algorithm: its step function and its defaults."""

    step: Step
    default_steps: int | None  # None: T (every timestep)
    spacing: str  # the default timestep spacing, see timestep_sequence


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm, None, "uniform"),
    "ddim": Sampler(ddim, 50, "uniform"),
    "dpmsolver": Sampler(dpmsolver, 20, "logsnr"),
}
"""Sampler name -> algorithm: the one list of sampler names."""


def check_sampler(name: str, what: str = "sampler") -> str:
    """``name`` if it is a registered sampler, else a ValueError naming ``what`` and the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"{what} must be one of {tuple(SAMPLERS)}, got {name!r}")
    return name


def repaint_walk(step: Step, model_fn: ModelFn, run: SamplingRun, x: Tensor) -> Tensor:
    """Run ``step`` along RePaint's resampling walk (Lugmayr et al. 2022, Alg. 1): x_T -> x_0.

    Per reverse step (the walk moves down one position): one model call, the algorithm's step, the
    known region replaced (inpainting), the callback. Per jump (the walk moves up j positions): the
    forward re-noising of :meth:`SamplingRun.renoise`; a multistep history no longer applies after it.
    Without resampling the walk is plain sampling. The final known-region replacement is :func:`sample`'s.

    Args:
        step: The algorithm, e.g. ``SAMPLERS["ddim"].step``.
        model_fn: ``model_fn(x_t (B, C, H, W), t long (B,)) -> eps (B, C, H, W)``.
        run: The prepared run.
        x: x_T, (B, C, H, W) in ``run.dtype``.

    Returns:
        x_0, (B, C, H, W) in ``run.dtype``.
    """
    for position, next_position in pairwise(run.walk):
        if next_position > position:  # RePaint: jump back up to a noisier timestep
            x = run.renoise(x, position, next_position)
            run.history = None
            continue
        eps = model_fn(x, run.t_batch(position)).to(run.dtype)
        x_prev, x0_pred = step(run, x, eps, run.alpha_bar_at(position), run.alpha_bar_at(next_position))
        x_prev = run.replace_known(x_prev, next_position)
        run.report(run.timesteps[position], x, x0_pred, x_prev)
        x = x_prev
    return x


# --------------------------------------------------------------------------- the entry point
def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    generator: Generators = None,
    device: torch.device | str | None = None,
    clip_denoised: bool = True,
    x_T: Tensor | None = None,
    known: Tensor | None = None,
    missing_mask: Tensor | None = None,
    resample_jump: int = 1,
    resample_times: int = 1,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Run the reverse process from noise to images.

    ``method="ddpm"`` with ``steps = T`` is exactly the ancestral sampler of Ho et al. Alg. 2
    (sigma_t^2 = beta_tilde_t, no noise at the last step); fewer steps respace the schedule.
    ``method="ddim"`` is Song et al. eq. 12. ``method="dpmsolver"`` is DPM-Solver++ 2M (Lu et al.
    2022, Alg. 2) with first-order first and last steps (:func:`dpmsolver`), by default on
    the ``"logsnr"`` spacing: integer timesteps from T - 1 to 0, uniform in log-SNR, the last
    network evaluation at t = 0 and then the clean end. (Uniform-in-t spacings leave the whole
    low-noise range, where pixel-level detail is resolved, to one or two steps: on Gaussian data
    with std 0.2 and the linear schedule, 20 steps give std 0.249 ("uniform") or 0.149
    ("trailing", whose last x_0 prediction is made at t = T/S - 1) against 0.199; "logsnr": 0.202.
    DPM-Solver's authors recommend logSNR for low-resolution images.)

    Inpainting by replacement: after each reverse step the known region of x_{t'} is replaced by
    q_sample(known, t', fresh noise), and the final output equals ``known`` exactly where
    ``missing_mask`` is 0. RePaint resampling (``resample_times > 1``) re-noises
    ``resample_jump`` steps back and redoes them (Lugmayr et al. 2022); it is meant for
    inpainting but also runs without it (DPM-Solver++ restarts its multistep history, first
    order, after each jump). Runs under ``torch.no_grad``. The algorithm is looked up in ``SAMPLERS``.

    Args:
        model_fn: ``model_fn(x_t (B, C, H, W) in ``dtype``, t long (B,)) -> eps (B, C, H, W)``.
        schedule: The noise schedule the model was trained with.
        shape: Output shape (B, C, H, W).
        method: A name in ``SAMPLERS``: ``"ddpm"``, ``"ddim"``, ``"dpmsolver"``.
        steps: Reverse steps (network evaluations without RePaint); default the sampler's
            (T for DDPM, 50 for DDIM and 20 for DPM-Solver++; at most T).
        eta: DDIM stochasticity (0 = deterministic); ignored by DDPM and DPM-Solver++.
        spacing: Timestep spacing, see :func:`timestep_sequence`; default the sampler's
            (``"uniform"`` for DDPM and DDIM, ``"logsnr"`` for DPM-Solver++).
        generator: None, one generator, or B generators (sample i reproducible on its own).
        device: Device of the sample; default: that of ``x_T``, else ``known``, else CPU.
        clip_denoised: Clip each predicted x_0 to [-1, 1].
        x_T: Start noise (B, C, H, W); drawn from ``generator`` if None.
        known: Known image for inpainting (B, C, H, W), in [-1, 1].
        missing_mask: (B, 1, H, W) or (B, C, H, W); 1 = missing (to generate), 0 = known.
        resample_jump: RePaint jump length j (in respaced steps).
        resample_times: RePaint resampling count r (1 = off).
        callback: Called after every reverse step with ``{"i": step index, "num_steps": total
            reverse steps, "t": timestep (int) the model saw, "x_t": that step's input,
            "x0_pred": predicted x_0, "x_prev": the step's output}`` (tensors are not reused,
            so they may be kept without cloning).
        progress: Show a tqdm progress bar.
        dtype: dtype of x_t, the noise and the update arithmetic (float32; float64 for
            reference checks). The model output is cast to it.

    Returns:
        Samples (B, C, H, W) in ``dtype``. Not clamped beyond the per-step x_0 clipping.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(SAMPLERS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sampler = SAMPLERS[method]
    shape = tuple(int(s) for s in shape)
    num_timesteps = schedule.num_timesteps
    if steps is None:
        steps = num_timesteps if sampler.default_steps is None else min(sampler.default_steps, num_timesteps)
    timesteps = timestep_sequence(num_timesteps, steps, spacing or sampler.spacing, schedule.alpha_bar).tolist()
    walk = resampling_walk(len(timesteps), resample_jump, resample_times)
    if resample_times > 1 and resample_jump >= len(timesteps):
        raise ValueError(f"resample_jump ({resample_jump}) must be < steps ({len(timesteps)})")

    if device is None:
        device = x_T.device if x_T is not None else known.device if known is not None else "cpu"
    device = torch.device(device)
    inpaint = inpainting_inputs(known, missing_mask, shape, device, dtype)
    # float64 alpha_bar of the respaced sequence as Python floats; index -1 (clean) -> 1.0.
    alpha_bar_all = schedule.alpha_bar.detach().to("cpu", torch.float64)
    run = SamplingRun(
        timesteps=timesteps,
        alpha_bars=alpha_bar_all[timesteps].tolist(),
        walk=walk,
        shape=shape,
        device=device,
        dtype=dtype,
        generator=generator,
        inpaint=inpaint,
        callback=callback,
        eta=eta,
        clip_denoised=clip_denoised,
        num_reverse=sum(1 for a, b in pairwise(walk) if b < a),
    )

    if x_T is None:
        x = run.randn()
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device, dtype)

    if progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.num_reverse, desc=f"{method} sampling", leave=False)
    try:
        with torch.no_grad():
            x = repaint_walk(sampler.step, model_fn, run, x)
    finally:
        if run.bar is not None:
            run.bar.close()
    if inpaint is not None:
        known_x0, missing = inpaint
        x = torch.where(missing, x, known_x0)
    return x
