"""The training objective as a small callable (in the style of EDM's ``EDMLoss``) and its randomness.

:class:`DiffusionLoss` gives the per-sample MSE of a network's prediction at (x_0, t, eps): the eps target
of Ho et al. 2020 (eq. 14) or the v target of Salimans & Ho 2022, optionally weighted per pixel by an
inpainting mask and per sample by Min-SNR-γ (Hang et al. 2023). It also draws the randomness of a
training step: timesteps, noise and label-dropout draws for the whole global batch from one generator
seeded by (seed, step, micro-batch), of which each rank keeps its own slice, so N processes with batch b
train exactly like one process with batch N * b. The caller passes the rank and world size in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from celldiff.diffusion.schedule import NoiseSchedule, min_snr_weight
from celldiff.seeds import mix_seed

LOSS_WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_BUCKETS = 4
"""Validation loss is also reported in this many timestep ranges (fractions of T): the loss at small t
(fine detail) and at large t (global structure) move very differently during training."""

Network = Callable[[Tensor, Tensor], Tensor]
"""``network(x_t (B, C, H, W), t long (B,)) -> prediction (B, C, H, W)``: eps or v, whichever it learns."""


class TrainingDraws(NamedTuple):
    """This rank's share of a training step's randomness."""

    t: Tensor  # timesteps, long (B,)
    noise: Tensor  # eps, (B, C, H, W), float32 (float64 for float64 images)
    label_drop: Tensor | None  # uniform [0, 1) per sample, float32 (B,); None without labels


def _loss_dtype(x: Tensor) -> torch.dtype:
    """The dtype of noise and loss arithmetic for images ``x``: at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


class DiffusionLoss:
    """Per-sample denoising loss with mask and Min-SNR weighting, and the draws it is computed at.

    Args:
        schedule: The noise schedule (forward process and v target).
        prediction_type: ``eps`` or ``v``: the target the network is compared with.
        weighting: ``uniform`` (the plain MSE) or ``min_snr`` (:func:`min_snr_weight` of the prediction type).
        min_snr_gamma: γ of ``min_snr``.
        mask_loss_weight: Weight of the squared error inside an inpainting mask relative to outside.
        loss_on_mask_only: Only the squared error inside the mask counts.
        seed: Seed of the training and validation draws.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "eps",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        mask_loss_weight: float = 1.0,
        loss_on_mask_only: bool = False,
        seed: int = 0,
    ) -> None:
        self.schedule, self.prediction_type = schedule, prediction_type
        self.weighting, self.min_snr_gamma = weighting, min_snr_gamma
        self.mask_loss_weight, self.loss_on_mask_only = mask_loss_weight, loss_on_mask_only
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, network: Network, x0: Tensor, t: Tensor, noise: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-sample MSE between ``network(x_t, t)`` and its target, float32 (B,) (Ho et al. eq. 14).

        Args:
            network: The network with its condition closed in (``Denoiser.forward``).
            x0: Clean images, (B, C, H, W) in [-1, 1].
            t: Timesteps, long (B,).
            noise: eps, (B, C, H, W): x_t = q_sample(x0, t, eps).
            mask: (B, 1, H, W), 1 = missing: with ``mask_loss_weight != 1`` or ``loss_on_mask_only`` a
                per-pixel weighted mean, weight 1 outside the mask and ``mask_loss_weight`` inside (or 0 / 1).

        Returns:
            The loss per sample, (B,). Not yet weighted per timestep (see :meth:`weighted`).
        """
        x_t = self.schedule.q_sample(x0, t, noise)
        target = noise if self.prediction_type == "eps" else self.schedule.velocity(x0, t, noise)
        error = F.mse_loss(network(x_t, t).float(), target.float(), reduction="none")
        if mask is None or (self.mask_loss_weight == 1.0 and not self.loss_on_mask_only):
            return error.flatten(1).mean(1)
        mask = mask.float().expand_as(error)
        weight = mask if self.loss_on_mask_only else 1.0 + (self.mask_loss_weight - 1.0) * mask
        return (weight * error).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)

    def weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the training loss at timesteps ``t`` (B,), float32.

        ``min_snr``: Min-SNR-γ for this prediction type from the float64 alpha_bar; ``uniform``: ones.
        """
        if self.weighting == "uniform":
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        alpha_bar = self.schedule.alpha_bar[t.to(self.schedule.alpha_bar.device)]
        return min_snr_weight(alpha_bar, self.min_snr_gamma, self.prediction_type).to(t.device, torch.float32)

    def weighted(self, per_sample: Tensor, t: Tensor) -> Tensor:
        """``per_sample`` (B,) times :meth:`weight` at ``t``; ``uniform`` returns it untouched (bitwise)."""
        return per_sample if self.weighting == "uniform" else per_sample * self.weight(t)

    # ------------------------------------------------------------------ randomness
    def generator(self, device: torch.device, *seed_parts: int) -> torch.Generator:
        """A generator on ``device`` (one per device, reused), reseeded from (seed, *seed_parts).

        Reseeding from the step makes the draws a pure function of (seed, step, ...), so a resumed
        run draws exactly what the uninterrupted run would have drawn.
        """
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(mix_seed(self.seed, *seed_parts))

    def draws(
        self, x0: Tensor, step: int, batch_idx: int, rank: int = 0, world: int = 1, with_labels: bool = False
    ) -> TrainingDraws:
        """Timesteps, noise and label-dropout draws of this rank's share of the global batch.

        Every rank draws the whole global batch's randomness from the same (seed, 0, step, batch_idx)
        generator and keeps slice ``rank``: each rank gets different noise, and ``world`` processes with
        batch B train exactly like one process with batch ``world * B`` on the same images.

        Args:
            x0: This rank's images, (B, C, H, W).
            step: The optimizer step; batch_idx: the micro-batch (gradient accumulation shares a step).
            rank, world: This process's rank and the number of processes.
            with_labels: Also draw the label-dropout numbers.
        """
        b, device = x0.shape[0], x0.device
        total = world * b
        gen = self.generator(device, 0, step, batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (total,), device=device, generator=gen)
        # Explicit float32: under --trainer.precision *-true Lightning makes bf16/fp16 the default
        # dtype inside the step, which would quantise the noise (the target of the loss).
        noise = torch.randn((total, *x0.shape[1:]), device=device, dtype=torch.float32, generator=gen)
        drop = torch.rand((total,), device=device, dtype=torch.float32, generator=gen) if with_labels else None
        mine = slice(rank * b, (rank + 1) * b)
        return TrainingDraws(t[mine], noise[mine].to(_loss_dtype(x0)), drop[mine] if drop is not None else None)

    def stratified_timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        """Evenly spread timesteps over [0, T), long (batch_size,): a low-variance, repeatable validation estimate."""
        # float64 explicitly: under *-true precisions the default dtype is bf16/fp16 in the step.
        grid = torch.arange(batch_size, device=device, dtype=torch.float64)
        return ((grid + 0.5) * self.schedule.num_timesteps / batch_size).long()

    def validation_draws(self, x0: Tensor, batch_idx: int, rank: int = 0) -> tuple[Tensor, Tensor]:
        """Stratified timesteps (B,) and noise (B, C, H, W) fixed per (rank, batch index): epochs compare."""
        gen = self.generator(x0.device, rank, 1, batch_idx)
        noise = torch.randn(x0.shape, device=x0.device, dtype=_loss_dtype(x0), generator=gen)
        return self.stratified_timesteps(x0.shape[0], x0.device), noise

    def timestep_buckets(self, per_sample: Tensor) -> Iterator[tuple[str, Tensor, int]]:
        """``(name, mean loss, count)`` of the stratified validation samples in each of ``TIMESTEP_BUCKETS`` ranges.

        The counts are known on the host (the stratified t are), so logging them needs no device sync.
        """
        steps = self.schedule.num_timesteps
        host_t = self.stratified_timesteps(per_sample.shape[0], torch.device("cpu"))
        for k in range(TIMESTEP_BUCKETS):
            lo, hi = k * steps // TIMESTEP_BUCKETS, (k + 1) * steps // TIMESTEP_BUCKETS
            in_bucket = (host_t >= lo) & (host_t < hi)
            count = int(in_bucket.sum())
            if count:
                yield f"loss_t{lo:04d}-{hi:04d}", per_sample[in_bucket.to(per_sample.device)].mean(), count
