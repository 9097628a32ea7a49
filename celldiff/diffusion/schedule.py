"""Noise schedules and the closed-form Gaussian maths of the forward process (pure, float64).

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), with 0-based
timesteps: index ``t`` in ``[0, T)`` is the paper's step ``t + 1``. So ``betas[0]`` is beta_1 and
``alpha_bar[T - 1]`` is alpha_bar_T.

Everything is built in float64 and kept there: ``alpha_bar`` near t = T is ~4e-5 for the linear
schedule, and quantities such as ``sqrt(1 / alpha_bar - 1)`` lose digits quickly in low precision.

The conversions between x_0, eps and x_t (:func:`diffuse`, :func:`x0_from_eps`, :func:`eps_from_x0`,
:func:`q_posterior_mean_variance`, :func:`snr`, :func:`log_snr`) take ``alpha_bar`` itself: a Python
float (the samplers, whose respaced steps know alpha_bar, not t) or a float64 tensor that broadcasts
against the images (the :class:`NoiseSchedule` methods, which gather it at ``t``). Either way the
coefficient is computed in float64 and meets the images in their dtype (at least float32), so a
sampler step and the schedule method give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

AlphaBar = float | Tensor
"""alpha_bar_t as a Python float, or a float64 tensor broadcastable to the images, e.g. (B, 1, 1, 1)."""

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


def _sqrt(value: AlphaBar) -> AlphaBar:
    return value.sqrt() if isinstance(value, Tensor) else math.sqrt(value)


def _coefficient(value: AlphaBar, x: Tensor) -> AlphaBar:
    """A float64 coefficient in ``x``'s compute dtype; a Python float meets ``x`` in that dtype as it is."""
    return value.to(x.device, _compute_dtype(x)) if isinstance(value, Tensor) else value


# --------------------------------------------------------------------------- conversions
def diffuse(x0: Tensor, noise: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps: a draw of q(x_t | x_0) (DDPM eq. 4).

    With alpha_bar = alpha_bar_{t+j} / alpha_bar_t and x_t in place of x_0 it is the forward jump
    q(x_{t+j} | x_t), the product of DDPM eq. 2's transitions between the two timesteps (RePaint eq. 9).

    Args:
        x0: Clean (or less noisy) data, (B, C, H, W).
        noise: Standard normal noise, (B, C, H, W).
        alpha_bar: alpha_bar_t, a float or a float64 tensor such as (B, 1, 1, 1).

    Returns:
        x_t, (B, C, H, W), in ``x0``'s dtype promoted to at least float32.
    """
    dtype = _compute_dtype(x0)
    signal = _coefficient(_sqrt(alpha_bar), x0)
    sigma = _coefficient(_sqrt(1.0 - alpha_bar), x0)
    return signal * x0.to(dtype) + sigma * noise.to(dtype)


def _inverse_coefficients(x_t: Tensor, alpha_bar: AlphaBar) -> tuple[AlphaBar, AlphaBar, Tensor]:
    """sqrt(1 / alpha_bar), sqrt(1 / alpha_bar - 1) in x_t's compute dtype, and x_t in it (for inverting eq. 4)."""
    recip = _coefficient(_sqrt(1.0 / alpha_bar), x_t)
    recipm1 = _coefficient(_sqrt(1.0 / alpha_bar - 1.0), x_t)
    return recip, recipm1, x_t.to(_compute_dtype(x_t))


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Invert DDPM eq. 4 for x_0: x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar).

    Written as sqrt(1 / alpha_bar) x_t - sqrt(1 / alpha_bar - 1) eps (improved-diffusion's form). Shapes:
    x_t, eps (B, C, H, W); alpha_bar a float or a float64 tensor such as (B, 1, 1, 1). Returns x_0
    (B, C, H, W) in ``x_t``'s dtype promoted to at least float32.
    """
    recip, recipm1, x_t = _inverse_coefficients(x_t, alpha_bar)
    return recip * x_t - recipm1 * eps.to(x_t.dtype)


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Invert DDPM eq. 4 for eps: (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1).

    Shapes: x_t and the (predicted, possibly clipped) x0 (B, C, H, W); alpha_bar as in :func:`x0_from_eps`.
    Returns eps (B, C, H, W) in ``x_t``'s dtype promoted to at least float32.
    """
    recip, recipm1, x_t = _inverse_coefficients(x_t, alpha_bar)
    return (recip * x_t - x0.to(x_t.dtype)) / recipm1


def q_posterior_mean_variance(
    x0: Tensor, x_t: Tensor, alpha_bar: AlphaBar, alpha_bar_prev: AlphaBar
) -> tuple[Tensor, AlphaBar]:
    """Posterior q(x_{t'} | x_t, x_0) for any earlier timestep t' < t (DDPM eqs. 6-7).

    With beta = 1 - alpha_bar_t / alpha_bar_{t'} (the schedule's own beta_t when t' = t - 1; the
    respaced beta of improved-diffusion otherwise):
    mean = sqrt(alpha_bar_{t'}) beta / (1 - alpha_bar_t) x_0
         + sqrt(1 - beta) (1 - alpha_bar_{t'}) / (1 - alpha_bar_t) x_t,
    variance = beta_tilde = beta (1 - alpha_bar_{t'}) / (1 - alpha_bar_t).

    Args:
        x0: (Predicted) clean data, (B, C, H, W).
        x_t: Noisy data, (B, C, H, W).
        alpha_bar: alpha_bar_t (float, or float64 tensor (B, 1, 1, 1)).
        alpha_bar_prev: alpha_bar_{t'} (1.0 for the clean end, where the variance is 0).

    Returns:
        ``(mean, variance)``: mean (B, C, H, W) in ``x_t``'s compute dtype; variance a float64
        float or tensor like ``alpha_bar``.
    """
    beta = 1.0 - alpha_bar / alpha_bar_prev
    coef_x0 = _sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)
    coef_xt = _sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    dtype = _compute_dtype(x_t)
    mean = _coefficient(coef_x0, x_t) * x0.to(dtype) + _coefficient(coef_xt, x_t) * x_t.to(dtype)
    return mean, beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)


def snr(alpha_bar: AlphaBar) -> AlphaBar:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021, eq. 2 with alpha^2 = alpha_bar)."""
    return alpha_bar / (1.0 - alpha_bar)


def log_snr(alpha_bar: AlphaBar) -> AlphaBar:
    """lambda = log(alpha / sigma) = 0.5 log(alpha_bar / (1 - alpha_bar)), decreasing in t (DPM-Solver's lambda).

    Computed as 0.5 (log alpha_bar - log1p(-alpha_bar)); a float alpha_bar >= 1 (the clean end) gives +inf.
    """
    if isinstance(alpha_bar, Tensor):
        return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))
    return math.inf if alpha_bar >= 1.0 else 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


# --------------------------------------------------------------------------- the schedule
class NoiseSchedule(nn.Module):
    """The forward process q(x_t | x_0) and posterior q(x_{t-1} | x_t, x_0) of a beta schedule.

    All coefficients are float64 buffers with ``persistent=False``: they are recomputed from
    (``schedule``, ``num_timesteps``), so checkpoints neither store nor depend on them. They stay
    float64 even if the owning module is cast (``.half()``, ``.to(torch.bfloat16)``, Lightning's
    ``*-true`` precisions): ``_apply`` restores the float64 values after any dtype conversion,
    while device moves are honoured. The methods gather coefficients at ``t`` in float64 and do the
    arithmetic in ``x``'s dtype promoted to at least float32 (``velocity`` and ``eps_from_v``: in
    float64, returned as float32); the result has that dtype.

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
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor

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
        # beta_tilde_t of DDPM eq. 7. beta_tilde_1 = 0 (alpha_bar_0 := 1), so its log is clipped by
        # repeating beta_tilde_2, as in Ho et al.'s code (beta_1 when T = 1).
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        first = posterior_variance[1:2] if num_timesteps > 1 else betas[:1]
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(torch.cat([first, posterior_variance[1:]])),
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

    def _at(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Float64 buffer ``name`` at ``t``, shaped (B, 1, ...) for ``x``, on ``x``'s device."""
        return extract(getattr(self, name), t, x.shape).to(x.device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (DDPM eq. 4).

        Args:
            x0: Clean data, (B, C, H, W).
            t: Timesteps, long, (B,).
            noise: Standard normal noise, (B, C, H, W).

        Returns:
            x_t, (B, C, H, W), in ``x0``'s dtype promoted to at least float32.
        """
        return diffuse(x0, noise, self._at("alpha_bar", t, x0))

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """:func:`x0_from_eps` at timesteps ``t`` (long, (B,)); x_t, eps (B, C, H, W) -> x_0 (B, C, H, W)."""
        return x0_from_eps(x_t, eps, self._at("alpha_bar", t, x_t))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """:func:`eps_from_x0` at timesteps ``t`` (long, (B,)); x_t, x0 (B, C, H, W) -> eps (B, C, H, W)."""
        return eps_from_x0(x_t, x0, self._at("alpha_bar", t, x_t))

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7), see :func:`q_posterior_mean_variance`.

        Args:
            x0: (Predicted) clean data, (B, C, H, W).
            x_t: Noisy data, (B, C, H, W).
            t: Timesteps, long, (B,).

        Returns:
            ``(mean, variance, log_variance_clipped)``: mean (B, C, H, W); variance and clipped
            log-variance (B, 1, 1, 1), in ``x_t``'s compute dtype.
        """
        alpha_bar, alpha_bar_prev = self._at("alpha_bar", t, x_t), self._at("alpha_bar_prev", t, x_t)
        mean, variance = q_posterior_mean_variance(x0, x_t, alpha_bar, alpha_bar_prev)
        dtype = _compute_dtype(x_t)
        return mean, variance.to(dtype), self._at("posterior_log_variance_clipped", t, x_t).to(dtype)

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, eq. 9 ff.).

        Args:
            x0: Clean data, (B, C, H, W).
            t: Timesteps, long, (B,).
            noise: The eps of x_t, (B, C, H, W).

        Returns:
            v, (B, C, H, W), float32 (computed in float64).
        """
        signal, sigma = self._at("sqrt_alpha_bar", t, x0), self._at("sqrt_one_minus_alpha_bar", t, x0)
        return (signal * noise.double() - sigma * x0.double()).float()

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t, the inverse of :meth:`velocity` given x_t.

        Args:
            x_t: Noisy data, (B, C, H, W).
            t: Timesteps, long, (B,).
            v: (Predicted) velocity, (B, C, H, W).

        Returns:
            eps, (B, C, H, W), float32 (computed in float64).
        """
        signal, sigma = self._at("sqrt_alpha_bar", t, x_t), self._at("sqrt_one_minus_alpha_bar", t, x_t)
        return (signal * v.double() + sigma * x_t.double()).float()

    def snr(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """:func:`snr` at timesteps ``t`` (long, (B,)) -> (B,) in ``dtype`` (computed in float64)."""
        alpha_bar = self.alpha_bar[t.to(device=self.alpha_bar.device, dtype=torch.long)]
        return snr(alpha_bar).to(device=t.device, dtype=dtype)


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
    if prediction_type == "eps":
        ratio = snr(alpha_bar)  # +inf only if alpha_bar == 1, where the weight is then 0
        return gamma / torch.maximum(ratio, torch.full_like(ratio, gamma))
    return torch.minimum(alpha_bar, gamma * (1.0 - alpha_bar))
