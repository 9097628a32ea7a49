"""Network + condition -> ``model_fn(x_t, t) -> eps``: inpainting channels, v -> eps, classifier-free guidance.

The network never sees the schedule and the sampler never owns the network: a :class:`Denoiser` knows how
to run a network on x_t with its condition (the inpainting U-Net's extra channels, class labels, the input
dtype and memory layout) and how to turn the network's output into the eps the samplers take (a v-model's
v converted by the schedule). Which network (the trained one or its EMA) is the caller's choice per call.

A condition is a dict: ``class_labels`` (B,) long or None; for inpainting ``known`` (B, 3, H, W) in
[-1, 1] and ``mask`` (B, 1, H, W), 1 = missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from celldiff.diffusion.samplers import ModelFn
from celldiff.diffusion.schedule import NoiseSchedule

PREDICTION_TYPES = ("eps", "v")


def inpainting_input(x_t: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """What the inpainting network sees: ``cat(x_t, masked image, mask)`` with masked image = known * (1 - mask).

    The masked image carries nothing of the missing region (exactly 0 there). The extra channels are
    computed in ``known``'s dtype and cast to ``x_t``'s.

    Args:
        x_t: Noisy images, (B, C, H, W).
        known: Images whose known part conditions the model, (B, C, H, W) in [-1, 1].
        mask: (B, 1, H, W), 1 = missing, any floating dtype.

    Returns:
        (B, 2 C + 1, H, W) in ``x_t``'s dtype.
    """
    mask = mask.to(known.dtype)
    return torch.cat([x_t, torch.cat([known * (1 - mask), mask], dim=1).to(x_t.dtype)], dim=1)


def guided_model_fn(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_u + scale (eps_c - eps_u).

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


def _network_dtype(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The floating dtype of ``net``'s parameters (bf16/fp16 under ``*-true`` precisions)."""
    for param in net.parameters():
        if param.is_floating_point():
            return param.dtype
    return default


@dataclass(frozen=True)
class Denoiser:
    """How a diffusion model's network is run and what its output means.

    Args:
        schedule: The noise schedule (only for v -> eps: the network itself never sees it).
        prediction_type: ``eps`` (Ho et al. 2020) or ``v`` (Salimans & Ho 2022): what the network outputs.
        inpainting: The network takes ``cat(x_t, masked image, mask)`` (:func:`inpainting_input`).
        null_class: Label index of the null (unconditional) class embedding, for guidance.
        channels_last: Hand the network channels-last inputs.
    """

    schedule: NoiseSchedule
    prediction_type: str = "eps"
    inpainting: bool = False
    null_class: int = 0
    channels_last: bool = False

    def forward(self, net: nn.Module, x_t: Tensor, t: Tensor, condition: dict[str, Any]) -> Tensor:
        """Run ``net`` on x_t (B, C, H, W) at timesteps t (B,) with its condition -> its raw output (B, C, H, W).

        The schedule, the loss and the samplers work in float32/float64; the network gets its input in
        its own parameter dtype (bf16/fp16 under --trainer.precision *-true; under autocast, *-mixed,
        the parameters are float32 and this is a no-op). The output is in the network's compute dtype.
        """
        x = x_t.to(_network_dtype(net, x_t.dtype))
        if self.inpainting:
            x = inpainting_input(x, condition["known"], condition["mask"])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t, class_labels=condition.get("class_labels"))

    def model_fn(self, net: nn.Module, condition: dict[str, Any], guidance_scale: float = 1.0) -> ModelFn:
        """Close ``net`` and ``condition`` over a ``model_fn(x_t, t) -> eps`` (float32) for the samplers.

        For a condition with class labels, classifier-free guidance with ``guidance_scale`` combines
        the conditional and the null-class predictions (:func:`guided_model_fn`); scale 1 and 0 give
        exactly one of the two.
        """
        labels = condition.get("class_labels")
        if labels is not None and guidance_scale != 1.0:
            unconditional = {**condition, "class_labels": torch.full_like(labels, self.null_class)}
            return guided_model_fn(self.model_fn(net, condition), self.model_fn(net, unconditional), guidance_scale)

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            output = self.forward(net, x_t, t, condition).float()
            return self.schedule.eps_from_v(x_t, t, output) if self.prediction_type == "v" else output

        return model_fn
