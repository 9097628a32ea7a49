"""Exponential moving average of a network's weights, with the decay warm-up and a host-side counter.

The EMA network is a frozen copy that samples better than the trained weights (Ho et al. 2020 use decay
0.9999). :class:`EMA` updates it after each optimizer step without a device->host sync: the warm-up
reads a host counter, which follows the module's ``ema_updates`` buffer whenever a state dict is loaded.
:func:`keep_float32` keeps the average in float32 when the module around it is cast to bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    """The averaging rule: ``ema <- decay ema + (1 - decay) weights`` after each optimizer step.

    Args:
        decay: The decay, in [0, 1).
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` after n updates, so early EMA weights are not
            dominated by the random initialisation.
        start_step: Optimizer steps before the EMA starts averaging (until then it copies the weights).
    """

    def __init__(self, decay: float, warmup: bool = True, start_step: int = 0) -> None:
        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        self.updates = 0  # host copy of the owner's ``ema_updates`` buffer: read without a device sync

    def load_counter(self, counter: Tensor) -> None:
        """Follow a loaded ``ema_updates`` buffer (resume, load_from_checkpoint, a weights file): one sync."""
        self.updates = int(counter)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0.0: a copy, before ``start_step``)."""
        if step < self.start_step:
            return 0.0
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, ema: nn.Module, net: nn.Module, step: int, counter: Tensor) -> None:
        """Move ``ema`` towards ``net`` (identical on every DDP rank) and count the update in ``counter``.

        No device->host sync: the warm-up reads the host counter and ``counter`` (the checkpointed
        buffer) is advanced on the device. A float32 EMA of bf16/fp16 weights lerps in float32 on a
        float32 copy of them. Buffers are copied, not averaged.
        """
        decay = self.decay_at(step)
        if step >= self.start_step:
            self.updates += 1
            counter.add_(1)
        ema_params = list(ema.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(net.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(ema.buffers(), net.buffers(), strict=True):
            ema_buf.copy_(buf)


def keep_float32(ema: nn.Module | None, apply: Callable[[], Any]) -> None:
    """Run ``apply`` (the owner's ``Module._apply``) but keep ``ema``'s float32 tensors float32.

    Lightning's ``*-true`` precisions call ``module.to(bfloat16)`` on the whole module. An EMA stored in
    bf16 would stop moving: with decay 0.9999 each update is 1e-4 of the gap, far below bf16's
    resolution (2^-8 relative). Device moves and casts to float32/float64 apply as usual; the EMA
    network then samples in float32 (the denoiser casts its input to the network's dtype).
    """
    kept = []
    if ema is not None:
        for module in ema.modules():
            for store in (module._parameters, module._buffers):
                for name, value in store.items():
                    if value is not None and value.dtype == torch.float32:
                        kept.append((store, name, value.data))  # .data: the float32 storage itself
    apply()
    for store, name, original in kept:
        value = store[name]
        if value is not None and value.dtype in (torch.float16, torch.bfloat16):
            restored = original.to(value.device)
            if isinstance(value, nn.Parameter):
                value.data = restored
            else:
                store[name] = restored
