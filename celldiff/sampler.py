"""Reverse-process samplers: DDPM, DDIM, DPM-Solver++ 2M, replacement inpainting with RePaint, guidance.

One entry point, :func:`sample`, serves every mode: it prepares the timesteps, the start noise and
the inpainting inputs (a :class:`SamplingRun`) and dispatches to the method's loop in ``SAMPLERS``
(``sample_ddpm``, ``sample_ddim``, ``sample_dpmsolver``). It never owns the network: it receives a
``model_fn(x_t, t) -> eps`` into which the caller has closed any conditioning (class labels,
inpainting masks, classifier-free guidance via :func:`guided_model_fn`); a v-model's caller converts
v to eps there.

Precision: x_t and all update arithmetic are float32 (``dtype=torch.float64`` for reference
checks); per-step coefficients are computed in float64 (Python floats) from the schedule's float64
``alpha_bar`` and the model output is cast to float32, so an autocast region around the call only
affects the network.

Random draws, in order (so a run is reproducible from its generator(s)): x_T (unless given);
then per reverse step the step noise (DDPM when not at the last step; DDIM only if eta > 0;
DPM-Solver++ never), then the noise for the known region (inpainting, not at the last step); per
RePaint jump the re-noising noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from celldiff.schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(x_t: float32 (B, C, H, W), t: long (B,)) -> eps (B, C, H, W)``."""

Generators = torch.Generator | Sequence[torch.Generator] | None

SPACINGS = ("uniform", "leading", "trailing", "logsnr")
LOGSNR_MIN = -5.1
"""Floor of the ``"logsnr"`` spacing's lambda range. The linear schedule's lambda(T - 1) is -5.06; the
cosine schedule's is -9.9 (its betas are clipped at 0.999 near T), where uniform-lambda points would
crowd into t > 980 (the floor diffusers advises for it as ``lambda_min_clipped``)."""


# --------------------------------------------------------------------------- timesteps / noise
def timestep_sequence(
    num_timesteps: int, steps: int, spacing: str = "uniform", alpha_bar: Tensor | None = None
) -> Tensor:
    """The sub-sequence of timesteps a respaced sampler visits (DDIM, strided DDPM, DPM-Solver++).

    Spacings (T = ``num_timesteps``, S = ``steps``):
      - ``"uniform"``: round(linspace(0, T - 1, S)), includes both 0 and T - 1 (improved-diffusion
        respacing; diffusers' DDIM ``"linspace"``); S = 1 gives [T - 1].
      - ``"leading"``: 0, T // S, 2 (T // S), ... (DDIM paper); may stop well short of T - 1.
      - ``"trailing"``: round(T - i T / S) - 1, includes T - 1 (Lin et al. 2024; diffusers'
        ``"trailing"``).
      - ``"logsnr"``: uniform in log-SNR lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)) from
        max(lambda(T - 1), ``LOGSNR_MIN``) to lambda(0) (DPM-Solver's ``logSNR`` skip type), each
        point snapped to the integer timestep nearest in lambda, then made strictly increasing; the
        first and last are always 0 and T - 1. Needs ``alpha_bar``. The sampler uses the exact alpha_bar of the snapped timesteps.
    Every spacing gives all of 0 .. T - 1 when S = T.

    Args:
        num_timesteps: T.
        steps: S, the number of reverse steps, 1 <= S <= T.
        spacing: One of ``SPACINGS``.
        alpha_bar: The schedule's alpha_bar, shape (T,); only ``"logsnr"`` uses it.

    Returns:
        Strictly increasing timesteps, long, shape (S,), values in [0, T).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (num_timesteps), got {steps}")
    if spacing == "uniform":
        if steps == 1:
            return torch.tensor([num_timesteps - 1], dtype=torch.long)
        seq = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round()
    elif spacing == "leading":
        seq = torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)
    elif spacing == "trailing":
        i = torch.arange(steps, dtype=torch.float64)
        seq = ((num_timesteps - i * num_timesteps / steps).round() - 1).flip(0)
    elif spacing == "logsnr":
        return _logsnr_timesteps(num_timesteps, steps, alpha_bar)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return seq.long()


def _logsnr_timesteps(num_timesteps: int, steps: int, alpha_bar: Tensor | None) -> Tensor:
    if alpha_bar is None:
        raise ValueError("spacing 'logsnr' needs the schedule's alpha_bar")
    ab = alpha_bar.detach().to("cpu", torch.float64)
    if tuple(ab.shape) != (num_timesteps,):
        raise ValueError(f"alpha_bar has shape {tuple(ab.shape)}, expected ({num_timesteps},)")
    if steps == 1:
        return torch.tensor([num_timesteps - 1], dtype=torch.long)
    lam = 0.5 * (ab.log() - torch.log1p(-ab))  # decreasing in t
    lam_min = max(lam[-1].item(), LOGSNR_MIN)
    targets = torch.linspace(lam[0].item(), lam_min, steps, dtype=torch.float64)
    seq = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    seq[0] = 0
    for i in range(1, steps):  # where lambda moves fast (t near 0 or T) points may snap together
        seq[i] = max(seq[i], seq[i - 1] + 1)
    seq[-1] = num_timesteps - 1
    for i in range(steps - 2, -1, -1):
        seq[i] = min(seq[i], seq[i + 1] - 1)
    return torch.tensor(seq, dtype=torch.long)


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise, drawn on each generator's own device, then moved to ``device``.

    With a list of generators, sample i is drawn from ``generator[i]`` alone, so it does not
    depend on which other samples share the batch (as in diffusers).

    Args:
        shape: (B, ...).
        generator: None (global RNG), one generator, or B generators (one per sample).
        device: Where the result goes; default the (first) generator's device, else CPU.
        dtype: Result dtype.

    Returns:
        Noise of ``shape``.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        return noise.to(device) if device is not None else noise
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    device = device if device is not None else generators[0].device
    return torch.stack(
        [
            torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device)
            for g in generators
        ]
    )


def resampling_walk(num_steps: int, jump: int = 1, times: int = 1) -> list[int]:
    """Positions visited by RePaint's resampling schedule (Lugmayr et al. 2022, Alg. 1 / Sec. 4.2).

    Position p in [0, S) holds x at the p-th respaced timestep; -1 is the clean output. The walk
    starts at S - 1 and moves down one position per reverse step. At each jump point p in
    {0, j, 2j, ...} with p + j <= S - 1 it goes back up j positions (forward re-noising) and
    redoes those steps, ``times - 1`` times. ``times = 1`` is plain sampling.

    Args:
        num_steps: S, the number of respaced reverse steps.
        jump: j, positions to go back per resampling.
        times: r, passes through each resampled stretch (1 = no resampling).

    Returns:
        Positions, from S - 1 to -1; consecutive entries differ by -1 (reverse step) or +j.
    """
    if jump < 1 or times < 1:
        raise ValueError(f"resample_jump and resample_times must be >= 1, got {jump}, {times}")
    remaining = {p: times - 1 for p in range(0, num_steps - jump, jump)}
    position = num_steps - 1
    walk = [position]
    while position >= 0:
        position -= 1
        walk.append(position)
        if remaining.get(position, 0) > 0:
            remaining[position] -= 1
            position += jump
            walk.append(position)
    return walk


# --------------------------------------------------------------------------- single steps
def _predict_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: float, clip_denoised: bool) -> Tensor:
    # Invert DDPM eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).
    x0 = math.sqrt(1.0 / alpha_bar_t) * x_t - math.sqrt(1.0 / alpha_bar_t - 1.0) * eps
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
    posterior mean of DDPM eq. 7 at the predicted x_0, which without clipping equals eq. 11's
    1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps); sigma^2 = beta_tilde_t.

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
    beta = 1.0 - alpha_bar_t / alpha_bar_prev
    x0 = _predict_x0(x_t, eps, alpha_bar_t, clip_denoised)
    coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)
    coef_xt = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    x_prev = coef_x0 * x0 + coef_xt * x_t
    variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
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
    x0 = _predict_x0(x_t, eps, alpha_bar_t, clip_denoised)
    if clip_denoised:
        eps = (math.sqrt(1.0 / alpha_bar_t) * x_t - x0) / math.sqrt(1.0 / alpha_bar_t - 1.0)
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


def _log_snr(alpha_bar: float) -> float:
    # lambda = log(alpha / sigma) = 0.5 log(alpha_bar / (1 - alpha_bar)); +inf at the clean end.
    return math.inf if alpha_bar >= 1.0 else 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


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
    lambda_s, lambda_t = _log_snr(alpha_bar_s), _log_snr(alpha_bar_t)
    h = lambda_t - lambda_s
    coef_x = math.sqrt((1.0 - alpha_bar_t) / (1.0 - alpha_bar_s))  # sigma_t / sigma_s
    coef_d = -math.sqrt(alpha_bar_t) * math.expm1(-h)  # alpha_t (1 - e^{-h})
    if x0_r is None:
        return coef_x * x_s + coef_d * x0_s
    if alpha_bar_r is None:
        raise ValueError("dpmsolver_step: a second-order step needs alpha_bar_r with x0_r")
    r0 = (lambda_s - _log_snr(alpha_bar_r)) / h
    return coef_x * x_s + coef_d * (x0_s + (0.5 / r0) * (x0_s - x0_r))


def _renoise(x: Tensor, alpha_bar_from: float, alpha_bar_to: float, noise: Tensor) -> Tensor:
    # Forward jump q(x_{t+j} | x_t) = N(sqrt(ab_{t+j} / ab_t) x_t, (1 - ab_{t+j} / ab_t) I),
    # the product of DDPM eq. 2's transitions between the two timesteps (RePaint eq. 9 / Alg. 1).
    ratio = alpha_bar_to / alpha_bar_from
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise


# --------------------------------------------------------------------------- guidance
def guided_model_fn(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + scale (eps_c - eps_u).

    ``scale = 0`` returns the unconditional model and ``scale = 1`` the conditional one, exactly
    and with a single network call. Otherwise both are called per step (for a single batched
    call, concatenate the two conditions inside one model_fn instead).

    Args:
        model_fn_cond: Conditional eps model.
        model_fn_uncond: Unconditional (null-label) eps model.
        scale: Guidance scale w (> 1 strengthens the condition).

    Returns:
        A model_fn returning float32 guided eps.
    """
    if scale == 0:
        return model_fn_uncond
    if scale == 1:
        return model_fn_cond

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        eps_c = model_fn_cond(x_t, t).float()
        eps_u = model_fn_uncond(x_t, t).float()
        return eps_u + scale * (eps_c - eps_u)

    return model_fn


# --------------------------------------------------------------------------- the sampler
def _inpainting_inputs(
    known: Tensor | None,
    missing_mask: Tensor | None,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor] | None:
    if known is None and missing_mask is None:
        return None
    if known is None or missing_mask is None:
        raise ValueError("inpainting needs both `known` and `missing_mask`")
    if tuple(known.shape) != shape:
        raise ValueError(f"known has shape {tuple(known.shape)}, expected {shape}")
    if (
        missing_mask.ndim != len(shape)
        or missing_mask.shape[0] != shape[0]
        or missing_mask.shape[1] not in (1, shape[1])
        or tuple(missing_mask.shape[2:]) != shape[2:]
    ):
        raise ValueError(
            f"missing_mask must have shape (B, 1 or C, H, W) matching {shape}, "
            f"got {tuple(missing_mask.shape)}"
        )
    return known.to(device, dtype), missing_mask.to(device) > 0.5


@dataclass
class SamplingRun:
    """What every sampling loop shares: the respaced timesteps, the walk, the draws, inpainting.

    Built by :func:`sample`; a loop (one per method, see ``SAMPLERS``) walks ``walk`` and calls
    :meth:`randn`, :meth:`renoise` and :meth:`replace_known` so that all methods draw their random
    numbers, re-noise and replace the known region the same way.
    """

    timesteps: list[int]
    alpha_bars: list[float]  # float64 alpha_bar of ``timesteps`` as Python floats
    walk: list[int]  # positions, see resampling_walk
    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    generator: Generators
    inpaint: tuple[Tensor, Tensor] | None  # (known, missing as bool)
    callback: Callable[[dict[str, Any]], None] | None
    bar: Any = None
    num_reverse: int = 0
    step_index: int = 0

    def alpha_bar_at(self, position: int) -> float:
        return self.alpha_bars[position] if position >= 0 else 1.0

    def randn(self) -> Tensor:
        return randn(self.shape, self.generator, self.device, self.dtype)

    def t_batch(self, position: int) -> Tensor:
        return torch.full((self.shape[0],), self.timesteps[position], dtype=torch.long, device=self.device)

    def renoise(self, x: Tensor, position: int, next_position: int) -> Tensor:
        """RePaint: jump back up from ``position`` to the noisier ``next_position``."""
        noise = self.randn()
        return _renoise(x, self.alpha_bar_at(position), self.alpha_bar_at(next_position), noise)

    def replace_known(self, x_prev: Tensor, next_position: int) -> Tensor:
        """Inpainting: the known region of x_{t'} := q_sample(known, t', fresh noise); exact at the end."""
        if self.inpaint is None:
            return x_prev
        known_x0, missing = self.inpaint
        if next_position < 0:
            known_noisy = known_x0
        else:  # q_sample(known, t') (DDPM eq. 4) for the known region
            alpha_bar_prev = self.alpha_bar_at(next_position)
            known_noisy = math.sqrt(alpha_bar_prev) * known_x0 + math.sqrt(1.0 - alpha_bar_prev) * self.randn()
        return torch.where(missing, x_prev, known_noisy)

    def report(self, t: int, x_t: Tensor, x0_pred: Tensor, x_prev: Tensor) -> None:
        """The per-step callback and progress bar."""
        if self.callback is not None:
            self.callback(
                {
                    "i": self.step_index,
                    "num_steps": self.num_reverse,
                    "t": t,
                    "x_t": x_t,
                    "x0_pred": x0_pred,
                    "x_prev": x_prev,
                }
            )
        self.step_index += 1
        if self.bar is not None:
            self.bar.update(1)


SamplerLoop = Callable[..., Tensor]
"""``loop(model_fn, run: SamplingRun, x: x_T, *, eta, clip_denoised) -> x_0`` (before the final
known-region replacement, which :func:`sample` does)."""


def _ancestral_loop(
    method: str, model_fn: ModelFn, run: SamplingRun, x: Tensor, *, eta: float, clip_denoised: bool
) -> Tensor:
    # DDPM (Ho et al. Alg. 2, respaced) and DDIM (Song et al. eq. 12): one model call per step;
    # draws per reverse step: the step noise (DDPM unless last; DDIM if eta > 0 unless last),
    # then the known region's noise (inpainting, unless last).
    for position, next_position in pairwise(run.walk):
        if next_position > position:  # RePaint: jump back up to a noisier timestep
            x = run.renoise(x, position, next_position)
            continue
        alpha_bar_t, alpha_bar_prev = run.alpha_bar_at(position), run.alpha_bar_at(next_position)
        eps = model_fn(x, run.t_batch(position)).to(run.dtype)
        last = next_position < 0
        if method == "ddpm":
            noise = None if last else run.randn()
            x_prev, x0_pred = ddpm_step(x, eps, alpha_bar_t, alpha_bar_prev, noise, clip_denoised=clip_denoised)
        else:
            noise = None if last or eta == 0 else run.randn()
            x_prev, x0_pred = ddim_step(
                x, eps, alpha_bar_t, alpha_bar_prev, noise, eta=eta, clip_denoised=clip_denoised
            )
        x_prev = run.replace_known(x_prev, next_position)
        run.report(run.timesteps[position], x, x0_pred, x_prev)
        x = x_prev
    return x


def sample_ddpm(
    model_fn: ModelFn, run: SamplingRun, x: Tensor, *, eta: float = 0.0, clip_denoised: bool = True
) -> Tensor:
    """Ancestral DDPM loop (``eta`` is ignored); see :func:`sample`."""
    return _ancestral_loop("ddpm", model_fn, run, x, eta=eta, clip_denoised=clip_denoised)


def sample_ddim(
    model_fn: ModelFn, run: SamplingRun, x: Tensor, *, eta: float = 0.0, clip_denoised: bool = True
) -> Tensor:
    """DDIM loop; see :func:`sample`."""
    return _ancestral_loop("ddim", model_fn, run, x, eta=eta, clip_denoised=clip_denoised)


def sample_dpmsolver(
    model_fn: ModelFn, run: SamplingRun, x: Tensor, *, eta: float = 0.0, clip_denoised: bool = True
) -> Tensor:
    """DPM-Solver++ 2M loop (Lu et al. 2022, Alg. 2): multistep second order in data prediction.

    Each step converts the model's eps to x_0 (:func:`_predict_x0`, clipped to [-1, 1] with
    ``clip_denoised``: static thresholding) and calls :func:`dpmsolver_step` with the previous
    step's x_0 prediction. The first step, the step after a RePaint jump (the history is stale)
    and the last step (to the clean end, which returns the x_0 prediction) are first order. It is
    deterministic given x_T: the only draws are x_T, the known region's noise after each non-last
    step (inpainting) and the RePaint re-noising noise. ``eta`` is ignored.
    """
    history: tuple[Tensor, float] | None = None  # (x0 prediction, alpha_bar) of the previous step
    for position, next_position in pairwise(run.walk):
        if next_position > position:  # RePaint: jump back up; the multistep history no longer applies
            x = run.renoise(x, position, next_position)
            history = None
            continue
        alpha_bar_s, alpha_bar_t = run.alpha_bar_at(position), run.alpha_bar_at(next_position)
        eps = model_fn(x, run.t_batch(position)).to(run.dtype)
        x0_pred = _predict_x0(x, eps, alpha_bar_s, clip_denoised)
        x0_r, alpha_bar_r = history if history is not None else (None, None)
        x_prev = dpmsolver_step(x, x0_pred, alpha_bar_s, alpha_bar_t, x0_r, alpha_bar_r)
        history = (x0_pred, alpha_bar_s)
        x_prev = run.replace_known(x_prev, next_position)
        run.report(run.timesteps[position], x, x0_pred, x_prev)
        x = x_prev
    return x


SAMPLERS: dict[str, SamplerLoop] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmsolver": sample_dpmsolver,
}
"""Sampling method name -> loop. :func:`sample` prepares a :class:`SamplingRun` and dispatches."""

SAMPLING_METHODS = tuple(SAMPLERS)
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmsolver": 20}  # None: T
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmsolver": "logsnr"}


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
    2022, Alg. 2) with first-order first and last steps (:func:`sample_dpmsolver`), by default on
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
    order, after each jump). Runs under ``torch.no_grad``. The method's loop is looked up in
    ``SAMPLERS``.

    Args:
        model_fn: ``model_fn(x_t (B, C, H, W) in ``dtype``, t long (B,)) -> eps (B, C, H, W)``.
        schedule: The noise schedule the model was trained with.
        shape: Output shape (B, C, H, W).
        method: One of ``SAMPLING_METHODS``: ``"ddpm"``, ``"ddim"``, ``"dpmsolver"``.
        steps: Reverse steps (network evaluations without RePaint); default T for DDPM, 50 for
            DDIM and 20 for DPM-Solver++ (at most T).
        eta: DDIM stochasticity (0 = deterministic); ignored by DDPM and DPM-Solver++.
        spacing: Timestep spacing, see :func:`timestep_sequence`; default ``"uniform"`` for
            DDPM and DDIM, ``"logsnr"`` for DPM-Solver++.
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
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(SAMPLING_METHODS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    shape = tuple(int(s) for s in shape)
    num_timesteps = schedule.num_timesteps
    if steps is None:
        default = DEFAULT_STEPS[method]
        steps = num_timesteps if default is None else min(default, num_timesteps)
    spacing = spacing or DEFAULT_SPACING[method]
    timesteps = timestep_sequence(num_timesteps, steps, spacing, schedule.alpha_bar).tolist()
    walk = resampling_walk(len(timesteps), resample_jump, resample_times)
    if resample_times > 1 and resample_jump >= len(timesteps):
        raise ValueError(f"resample_jump ({resample_jump}) must be < steps ({len(timesteps)})")

    if device is None:
        device = x_T.device if x_T is not None else known.device if known is not None else "cpu"
    device = torch.device(device)
    inpaint = _inpainting_inputs(known, missing_mask, shape, device, dtype)
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
            x = SAMPLERS[method](model_fn, run, x, eta=eta, clip_denoised=clip_denoised)
    finally:
        if run.bar is not None:
            run.bar.close()
    if inpaint is not None:
        known_x0, missing = inpaint
        x = torch.where(missing, x, known_x0)
    return x
