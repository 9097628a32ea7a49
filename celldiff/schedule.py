"""Noise schedules and the closed-form Gaussian maths of the forward process (pure, float64).

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), with 0-based
timesteps: index ``t`` in ``[0, T)`` is the paper's step ``t + 1``. So ``betas[0]`` is beta_1 and
``alpha_bar[T - 1]`` is alpha_bar_T.

Everything is built in float64 and kept there: ``alpha_bar`` near t = T is ~4e-5 for the linear
schedule, and quantities such as ``sqrt(1 / alpha_bar - 1)`` lose digits quickly in low precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

BETA_SCHEDULES = ("linear", "cosine")


def linear_beta_schedule(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Linearly increasing betas (Ho et al. 2020, Sec. 4).

    Ho et al. chose ``beta_start`` and ``beta_end`` for T = 1000. For another T both endpoints are
    multiplied by ``1000 / T`` (as improved-diffusion does), so that the total noise injected, and
    thus alpha_bar_T, stays roughly the same: a 100-step schedule is not left almost noise-free.

    Args:
        num_timesteps: T, the number of diffusion steps.
        beta_start: beta_1 at T = 1000.
        beta_end: beta_T at T = 1000.

    Returns:
        betas, shape (T,), float64.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor, num_timesteps: int, s: float = 0.008) -> Tensor:
    """f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), un-normalised (Nichol & Dhariwal, eq. 17).

    Args:
        t: Continuous time in [0, T], any shape; computed in float64.
        num_timesteps: T.
        s: Small offset that keeps beta_t from being vanishingly small near t = 0.

    Returns:
        f(t), same shape as ``t``, float64. alpha_bar_t = f(t) / f(0).
    """
    t = t.to(torch.float64)
    return torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at ``max_beta`` to avoid the singularity
    at t = T (where alpha_bar -> 0). Away from the clip, ``cumprod(1 - betas)`` equals
    f(t + 1) / f(0) for 0-based index t.

    Args:
        num_timesteps: T.
        s: Offset of eq. 17.
        max_beta: Upper bound on every beta.

    Returns:
        betas, shape (T,), float64.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = cosine_alpha_bar(steps, num_timesteps, s)
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


_SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}


def make_beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """Betas of a named schedule.

    Args:
        name: One of ``BETA_SCHEDULES`` (``"linear"``, ``"cosine"``).
        num_timesteps: T.

    Returns:
        betas, shape (T,), float64.
    """
    if name not in _SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {name!r}; valid names: {', '.join(BETA_SCHEDULES)}"
        )
    return _SCHEDULES[name](num_timesteps)


def extract(a: Tensor, t: Tensor, shape: Sequence[int]) -> Tensor:
    """Gather per-sample coefficients ``a[t]`` and shape them to broadcast against ``shape``.

    Args:
        a: Coefficients, shape (T,).
        t: Timestep indices, long, shape (B,).
        shape: Shape of the tensor the result multiplies, (B, ...).

    Returns:
        ``a[t]`` with shape (B, 1, ..., 1) (``len(shape)`` dims), dtype of ``a``, on ``t``'s device.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    out = a[t.to(device=a.device, dtype=torch.long)]
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1))).to(t.device)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Arithmetic dtype for ``x``: its own dtype, but never below float32 (bf16/fp16 -> fp32)."""
    return torch.promote_types(x.dtype, torch.float32)


class NoiseSchedule(nn.Module):
    """The forward process q(x_t | x_0) and posterior q(x_{t-1} | x_t, x_0) of a beta schedule.

    All coefficients are float64 buffers with ``persistent=False``: they are recomputed from
    (``schedule``, ``num_timesteps``), so checkpoints neither store nor depend on them. They stay
    float64 even if the owning module is cast (``.half()``, ``.to(torch.bfloat16)``, Lightning's
    ``*-true`` precisions): ``_apply`` restores the float64 values after any dtype conversion,
    while device moves are honoured. The methods gather coefficients in float64 and do the
    arithmetic in ``x``'s dtype promoted to at least float32; the result has that dtype.

    Args:
        schedule: Beta schedule name: ``"linear"`` (Ho et al.) or ``"cosine"`` (Nichol & Dhariwal).
        num_timesteps: T, the number of diffusion steps.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor
    sqrt_recip_alpha_bar: Tensor
    sqrt_recipm1_alpha_bar: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000) -> None:
        super().__init__()
        self.schedule_name = schedule
        self.num_timesteps = num_timesteps
        betas = make_beta_schedule(schedule, num_timesteps)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"{schedule!r} schedule with num_timesteps={num_timesteps} has betas outside "
                "(0, 1) (the linear schedule scales beta_end = 0.02 by 1000 / T: it needs T > 20)"
            )

        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde_t I):
        # DDPM eq. 7. beta_tilde_1 = 0 (alpha_bar_0 := 1), so its log is clipped by repeating
        # beta_tilde_2, as in Ho et al.'s code (beta_1 when T = 1).
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        first = posterior_variance[1:2] if num_timesteps > 1 else betas[:1]
        log_var = torch.log(torch.cat([first, posterior_variance[1:]]))
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": alpha_bar.rsqrt(),
            "sqrt_recipm1_alpha_bar": (1.0 / alpha_bar - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": log_var,
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_mean_coef2": (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NoiseSchedule:
        # Module.half()/.to(dtype) would cast the float64 buffers; re-create them in float64
        # from the originals (no precision round trip) on whatever device ``fn`` moved them to.
        originals = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if original is not None and moved is not None and moved.dtype != torch.float64:
                self._buffers[name] = original.to(device=moved.device, dtype=torch.float64)
        return self

    def extra_repr(self) -> str:
        return f"schedule={self.schedule_name!r}, num_timesteps={self.num_timesteps}"

    def _coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Buffer ``name`` at ``t``, shaped (B, 1, ...) for ``x``, in ``x``'s compute dtype."""
        return extract(getattr(self, name), t, x.shape).to(x.device, _compute_dtype(x))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (DDPM eq. 4).

        Args:
            x0: Clean data, (B, C, H, W).
            t: Timesteps, long, (B,).
            noise: Standard normal noise, (B, C, H, W).

        Returns:
            x_t, (B, C, H, W), in ``x0``'s dtype promoted to at least float32.
        """
        dtype = _compute_dtype(x0)
        return self._coef("sqrt_alpha_bar", t, x0) * x0.to(dtype) + self._coef(
            "sqrt_one_minus_alpha_bar", t, x0
        ) * noise.to(dtype)

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert eq. 4 for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).

        Args:
            x_t: Noisy data, (B, C, H, W).
            t: Timesteps, long, (B,).
            eps: Predicted noise, (B, C, H, W).

        Returns:
            Predicted x_0, (B, C, H, W).
        """
        dtype = _compute_dtype(x_t)
        return self._coef("sqrt_recip_alpha_bar", t, x_t) * x_t.to(dtype) - self._coef(
            "sqrt_recipm1_alpha_bar", t, x_t
        ) * eps.to(dtype)

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Invert eq. 4 for eps: (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1).

        Args:
            x_t: Noisy data, (B, C, H, W).
            t: Timesteps, long, (B,).
            x0: (Predicted) clean data, (B, C, H, W).

        Returns:
            The noise eps, (B, C, H, W).
        """
        dtype = _compute_dtype(x_t)
        numerator = self._coef("sqrt_recip_alpha_bar", t, x_t) * x_t.to(dtype) - x0.to(dtype)
        return numerator / self._coef("sqrt_recipm1_alpha_bar", t, x_t)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

        mean = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) x_0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
        variance = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.

        Args:
            x0: (Predicted) clean data, (B, C, H, W).
            x_t: Noisy data, (B, C, H, W).
            t: Timesteps, long, (B,).

        Returns:
            ``(mean, variance, log_variance_clipped)``: mean (B, C, H, W); variance and clipped
            log-variance (B, 1, 1, 1), in ``x_t``'s compute dtype.
        """
        dtype = _compute_dtype(x_t)
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0.to(dtype) + self._coef(
            "posterior_mean_coef2", t, x_t
        ) * x_t.to(dtype)
        variance = self._coef("posterior_variance", t, x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def snr(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (e.g. for min-SNR loss weights).

        Args:
            t: Timesteps, long, (B,).
            dtype: Result dtype (computed in float64).

        Returns:
            SNR, shape (B,).
        """
        alpha_bar = self.alpha_bar[t.to(device=self.alpha_bar.device, dtype=torch.long)]
        return (alpha_bar / (1.0 - alpha_bar)).to(device=t.device, dtype=dtype)


LOSS_WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weight(alpha_bar: Tensor, gamma: float, prediction_type: str = "eps") -> Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 10 and its ε / v forms), computed in float64.

    With SNR = alpha_bar / (1 - alpha_bar), the weight of the ε-prediction MSE is
    min(SNR, γ) / SNR and that of the v-prediction MSE is min(SNR, γ) / (SNR + 1). Both are
    written without a division that can blow up: ε: γ / max(SNR, γ), which is exactly 1 once
    SNR < γ (no 0/0 as SNR -> 0, t -> T) and γ / SNR -> 0 as SNR -> ∞ (t -> 0);
    v: 1 / (SNR + 1) = 1 - alpha_bar, so the weight is min(alpha_bar, γ (1 - alpha_bar)).
    Both lie in [0, 1] for every alpha_bar in [0, 1].

    Args:
        alpha_bar: Cumulative products alpha_bar_t (any shape), e.g. ``schedule.alpha_bar[t]``.
        gamma: The clamp γ > 0 (the paper's default is 5).
        prediction_type: ``"eps"`` or ``"v"``: what the loss compares.

    Returns:
        The weights, same shape and device as ``alpha_bar``, float64.
    """
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"min-SNR gamma must be a finite number > 0, got {gamma!r}")
    if prediction_type not in ("eps", "v"):
        raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
    alpha_bar = alpha_bar.to(torch.float64)
    one_minus = 1.0 - alpha_bar
    if prediction_type == "eps":
        snr = alpha_bar / one_minus  # +inf only if alpha_bar == 1, where the weight is then 0
        return gamma / torch.maximum(snr, torch.full_like(snr, gamma))
    return torch.minimum(alpha_bar, gamma * one_minus)
