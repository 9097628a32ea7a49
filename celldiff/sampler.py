"""Reverse-process samplers: DDPM, DDIM, replacement inpainting with RePaint resampling, guidance.

One function, :func:`sample`, serves every mode. It never owns the network: it receives a
``model_fn(x_t, t) -> eps`` into which the caller has closed any conditioning (class labels,
inpainting masks, classifier-free guidance via :func:`guided_model_fn`).

Precision: x_t and all update arithmetic are float32; per-step coefficients are computed in
float64 (Python floats) from the schedule's float64 ``alpha_bar`` and the model output is cast to
float32, so an autocast region around the call only affects the network.

Random draws, in order (so a run is reproducible from its generator(s)): x_T (unless given);
then per reverse step the step noise (DDPM when not at the last step; DDIM only if eta > 0), then
the noise for the known region (inpainting, not at the last step); per RePaint jump the
re-noising noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from celldiff.schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(x_t: float32 (B, C, H, W), t: long (B,)) -> eps (B, C, H, W)``."""

Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLING_METHODS = ("ddpm", "ddim")
SPACINGS = ("uniform", "leading", "trailing")


# --------------------------------------------------------------------------- timesteps / noise
def timestep_sequence(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """The sub-sequence of timesteps visited by a respaced sampler (DDIM, strided DDPM).

    Spacings (T = ``num_timesteps``, S = ``steps``):
      - ``"uniform"``: round(linspace(0, T - 1, S)), includes both 0 and T - 1 (improved-diffusion
        respacing); S = 1 gives [T - 1].
      - ``"leading"``: 0, T // S, 2 (T // S), ... (DDIM paper); may stop well short of T - 1.
      - ``"trailing"``: round(T - i T / S) - 1, includes T - 1 (Lin et al. 2024).
    Every spacing gives all of 0 .. T - 1 when S = T.

    Args:
        num_timesteps: T.
        steps: S, the number of reverse steps, 1 <= S <= T.
        spacing: One of ``SPACINGS``.

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
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return seq.long()


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
    return known.to(device, torch.float32), missing_mask.to(device) > 0.5


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = "uniform",
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
) -> Tensor:
    """Run the reverse process from noise to images.

    ``method="ddpm"`` with ``steps = T`` is exactly the ancestral sampler of Ho et al. Alg. 2
    (sigma_t^2 = beta_tilde_t, no noise at the last step); fewer steps respace the schedule.
    ``method="ddim"`` is Song et al. eq. 12. Inpainting by replacement: after each reverse step
    the known region of x_{t'} is replaced by q_sample(known, t', fresh noise), and the final
    output equals ``known`` exactly where ``missing_mask`` is 0. RePaint resampling
    (``resample_times > 1``) re-noises ``resample_jump`` steps back and redoes them (Lugmayr et
    al. 2022); it is meant for inpainting but also runs without it. Runs under ``torch.no_grad``.

    Args:
        model_fn: ``model_fn(x_t float32 (B, C, H, W), t long (B,)) -> eps (B, C, H, W)``.
        schedule: The noise schedule the model was trained with.
        shape: Output shape (B, C, H, W).
        method: ``"ddpm"`` or ``"ddim"``.
        steps: Reverse steps; default T for DDPM, 50 (or T if smaller) for DDIM.
        eta: DDIM stochasticity (0 = deterministic); ignored by DDPM.
        spacing: Timestep spacing when respacing, see :func:`timestep_sequence`.
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

    Returns:
        Samples, float32 (B, C, H, W). Not clamped beyond the per-step x_0 clipping.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(SAMPLING_METHODS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    shape = tuple(int(s) for s in shape)
    num_timesteps = schedule.num_timesteps
    if steps is None:
        steps = num_timesteps if method == "ddpm" else min(50, num_timesteps)
    timesteps = timestep_sequence(num_timesteps, steps, spacing).tolist()
    walk = resampling_walk(len(timesteps), resample_jump, resample_times)
    if resample_times > 1 and resample_jump >= len(timesteps):
        raise ValueError(f"resample_jump ({resample_jump}) must be < steps ({len(timesteps)})")

    if device is None:
        device = x_T.device if x_T is not None else known.device if known is not None else "cpu"
    device = torch.device(device)
    inpaint = _inpainting_inputs(known, missing_mask, shape, device)
    # float64 alpha_bar of the respaced sequence as Python floats; index -1 (clean) -> 1.0.
    alpha_bar_all = schedule.alpha_bar.detach().to("cpu", torch.float64)
    alpha_bars = alpha_bar_all[timesteps].tolist()

    def alpha_bar_at(position: int) -> float:
        return alpha_bars[position] if position >= 0 else 1.0

    if x_T is None:
        x = randn(shape, generator, device)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device, torch.float32)

    num_reverse = sum(1 for a, b in pairwise(walk) if b < a)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_reverse, desc=f"{method} sampling", leave=False)
    step_index = 0
    with torch.no_grad():
        for position, next_position in pairwise(walk):
            if next_position > position:  # RePaint: jump back up to a noisier timestep
                noise = randn(shape, generator, device)
                x = _renoise(x, alpha_bar_at(position), alpha_bar_at(next_position), noise)
                continue
            t = timesteps[position]
            alpha_bar_t, alpha_bar_prev = alpha_bar_at(position), alpha_bar_at(next_position)
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
            eps = model_fn(x, t_batch).float()
            last = next_position < 0
            if method == "ddpm":
                noise = None if last else randn(shape, generator, device)
                x_prev, x0_pred = ddpm_step(
                    x, eps, alpha_bar_t, alpha_bar_prev, noise, clip_denoised=clip_denoised
                )
            else:
                noise = None if last or eta == 0 else randn(shape, generator, device)
                x_prev, x0_pred = ddim_step(
                    x, eps, alpha_bar_t, alpha_bar_prev, noise, eta=eta, clip_denoised=clip_denoised
                )
            if inpaint is not None:
                known_x0, missing = inpaint
                if last:
                    known_noisy = known_x0
                else:  # q_sample(known, t') (DDPM eq. 4) for the known region
                    known_noisy = math.sqrt(alpha_bar_prev) * known_x0 + math.sqrt(
                        1.0 - alpha_bar_prev
                    ) * randn(shape, generator, device)
                x_prev = torch.where(missing, x_prev, known_noisy)
            if callback is not None:
                callback(
                    {
                        "i": step_index,
                        "num_steps": num_reverse,
                        "t": t,
                        "x_t": x,
                        "x0_pred": x0_pred,
                        "x_prev": x_prev,
                    }
                )
            x = x_prev
            step_index += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if inpaint is not None:
        known_x0, missing = inpaint
        x = torch.where(missing, x, known_x0)
    return x
