"""What a NaN or infinite training loss does: stop with a message naming the step, skip the step, or train on.

``error`` copies the loss's is-finite flag to the host without waiting and looks at it at the next
micro-batch (or the epoch's end), so the device never stalls and the run stops before a second bad step.
``skip`` agrees across DDP ranks (one reduction per step) and leaves the step (under gradient
accumulation: the micro-batch) out. ``ignore`` trains on.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from celldiff.errors import NonFiniteLossError

NONFINITE_POLICIES = ("error", "skip", "ignore")


class PendingFinite:
    """A micro-batch's is-finite flag on its way to the host (copied without waiting).

    On CUDA the copy is asynchronous: the host may read it only once ``event`` has passed.
    Waiting on that event when the next micro-batch starts costs nothing in practice (the device
    finished that forward long ago; it is still busy with the backward queued after it).
    """

    def __init__(self, step: int, batch_idx: int, finite: Tensor, loss: Tensor) -> None:
        self.step, self.batch_idx, self.loss = step, batch_idx, loss
        self.event: torch.cuda.Event | None = None
        if finite.device.type == "cuda":
            self.flag = finite.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(finite.device))
        else:  # CPU: the flag itself; other devices: a plain (ordered) copy
            self.flag = finite.to("cpu")

    def is_finite(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # the copy has landed (usually long ago): no stall
        return bool(self.flag)


class NonFiniteGuard:
    """Applies a policy of ``NONFINITE_POLICIES`` to each training loss of ``module``."""

    def __init__(self) -> None:
        self.pending: PendingFinite | None = None  # the last micro-batch's flag, checked at the next
        self.skipped_steps = 0

    @staticmethod
    def _accumulating(module: L.LightningModule) -> bool:
        return module._trainer is not None and module.trainer.accumulate_grad_batches > 1

    def _where(self, module: L.LightningModule, step: int, batch_idx: int) -> str:
        """'step 7', or under gradient accumulation 'step 7 (batch 15)': which micro-batch."""
        return f"step {step} (batch {batch_idx})" if self._accumulating(module) else f"step {step}"

    def __call__(self, module: L.LightningModule, policy: str, loss: Tensor, batch_idx: int = 0) -> Tensor | None:
        """The loss to train on, or None to skip this (micro-)batch."""
        if policy == "ignore":
            return loss
        finite = torch.isfinite(loss.detach())
        if policy == "skip":
            # Every rank must agree, or DDP would wait forever for the rank that skipped.
            if not bool(module.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0):
                self.skipped_steps += 1
                # Under gradient accumulation only this micro-batch is left out of the step.
                what = "batch skipped" if self._accumulating(module) else "step skipped"
                module.print(f"celldiff: non-finite loss at {self._where(module, module.global_step, batch_idx)}; {what}")
                return None
            return loss
        # "error": look at the previous flag, then queue this one (under gradient accumulation several
        # micro-batches share one global_step, so each keeps its own step and batch index).
        self.check(module)
        self.pending = PendingFinite(module.global_step, batch_idx, finite, loss.detach())
        return loss

    def check(self, module: L.LightningModule) -> None:
        """Raise NonFiniteLossError if the pending flag says the last loss was not finite."""
        pending, self.pending = self.pending, None
        if pending is not None and not pending.is_finite():
            raise NonFiniteLossError(
                f"training loss is {pending.loss.item()} at {self._where(module, pending.step, pending.batch_idx)}: "
                "stopping (lower model.lr, use --trainer.precision 32-true or bf16-mixed, or set "
                "model.nonfinite_loss skip)"
            )
