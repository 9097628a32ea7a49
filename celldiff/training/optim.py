"""The optimiser both celldiff models train with: AdamW, linear warm-up, then cosine decay (or constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

LR_SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio`` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_warmup(
    param_groups: Iterable[Any],
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_ratio: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    fused: bool = False,
) -> dict[str, Any]:
    """AdamW and its per-step LambdaLR schedule, as ``LightningModule.configure_optimizers`` returns them.

    Args:
        param_groups: Parameters, or AdamW parameter groups (dicts) with their own ``weight_decay``.
        lr: Peak learning rate.
        total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        warmup_steps: Linear warm-up steps from lr / warmup_steps to lr.
        schedule: ``cosine`` (decay to ``min_ratio * lr`` at ``total_steps``) or ``constant``.
        min_ratio: Final learning rate of the cosine schedule, as a fraction of ``lr``.
        betas: AdamW betas.
        weight_decay: AdamW weight decay of groups that do not set their own.
        fused: Fused AdamW (one kernel per step on CUDA).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)
    total = max(1, int(total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total, schedule, min_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
