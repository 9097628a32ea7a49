"""The path a sampler takes: the timesteps it visits, RePaint's walk over them, its draws and the known region.

:func:`timestep_sequence` picks the S of the T timesteps a respaced sampler visits (four spacings);
:func:`resampling_walk` is the order RePaint visits them in (Lugmayr et al. 2022); :func:`randn` draws noise
so that sample i depends only on its own generator; a :class:`SamplingRun` holds all of it for one call of
``celldiff.diffusion.samplers.sample``, with the known region of an inpainting run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from celldiff.diffusion.schedule import diffuse, log_snr

Generators = torch.Generator | Sequence[torch.Generator] | None

SPACINGS = ("uniform", "leading", "trailing", "logsnr")
LOGSNR_MIN = -5.1
"""Floor of the ``"logsnr"`` spacing's lambda range. The linear schedule's lambda(T - 1) is -5.06; the
cosine schedule's is -9.9 (its betas are clipped at 0.999 near T), where uniform-lambda points would
crowd into t > 980 (the floor diffusers advises for it as ``lambda_min_clipped``)."""


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
        first and last are always 0 and T - 1. Needs ``alpha_bar``. The sampler uses the exact
        alpha_bar of the snapped timesteps.
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
    lam = log_snr(ab)  # decreasing in t
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


# --------------------------------------------------------------------------- one run
def inpainting_inputs(
    known: Tensor | None, missing_mask: Tensor | None, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
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
            f"missing_mask must have shape (B, 1 or C, H, W) matching {shape}, got {tuple(missing_mask.shape)}"
        )
    return known.to(device, dtype), missing_mask.to(device) > 0.5


@dataclass
class SamplingRun:
    """What every algorithm shares: the respaced timesteps, the walk, the draws, inpainting.

    Built by ``samplers.sample``; ``samplers.repaint_walk`` walks ``walk`` and the algorithms call
    :meth:`randn`, so that all of them draw their random numbers, re-noise and replace the known region
    the same way.
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
    eta: float = 0.0
    clip_denoised: bool = True
    history: tuple[Tensor, float] | None = None  # a multistep algorithm's last (x0_pred, alpha_bar)
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
        """RePaint: jump back up from ``position`` to the noisier ``next_position`` (RePaint eq. 9 / Alg. 1)."""
        noise = self.randn()
        return diffuse(x, noise, self.alpha_bar_at(next_position) / self.alpha_bar_at(position))

    def replace_known(self, x_prev: Tensor, next_position: int) -> Tensor:
        """Inpainting: the known region of x_{t'} := q_sample(known, t', fresh noise) (DDPM eq. 4); exact at the end."""
        if self.inpaint is None:
            return x_prev
        known_x0, missing = self.inpaint
        if next_position < 0:
            return torch.where(missing, x_prev, known_x0)
        return torch.where(missing, x_prev, diffuse(known_x0, self.randn(), self.alpha_bar_at(next_position)))

    def report(self, t: int, x_t: Tensor, x0_pred: Tensor, x_prev: Tensor) -> None:
        """The per-step callback and progress bar."""
        if self.callback is not None:
            step = {"i": self.step_index, "num_steps": self.num_reverse, "t": t}
            self.callback({**step, "x_t": x_t, "x0_pred": x0_pred, "x_prev": x_prev})
        self.step_index += 1
        if self.bar is not None:
            self.bar.update(1)
