"""Old path of ``celldiff.diffusion.schedule`` (and the loss weightings of ``celldiff.diffusion.loss``)."""

# TRANSITIONAL: removed by D
from celldiff.diffusion.loss import LOSS_WEIGHTINGS
from celldiff.diffusion.schedule import (
    BETA_SCHEDULES,
    NoiseSchedule,
    cosine_alpha_bar,
    cosine_beta_schedule,
    extract,
    linear_beta_schedule,
    make_beta_schedule,
    min_snr_weight,
)

__all__ = [
    "BETA_SCHEDULES",
    "LOSS_WEIGHTINGS",
    "NoiseSchedule",
    "cosine_alpha_bar",
    "cosine_beta_schedule",
    "extract",
    "linear_beta_schedule",
    "make_beta_schedule",
    "min_snr_weight",
]
