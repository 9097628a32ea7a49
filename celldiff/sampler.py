"""Old path of ``celldiff.diffusion.samplers`` (with ``trajectory`` and the guidance of ``denoiser``)."""

# TRANSITIONAL: removed by D
from celldiff.diffusion.denoiser import guided_model_fn
from celldiff.diffusion.samplers import (
    SAMPLERS,
    ModelFn,
    ddim_step,
    ddpm_step,
    dpmsolver_step,
    sample,
)
from celldiff.diffusion.trajectory import LOGSNR_MIN, SPACINGS, SamplingRun, randn, resampling_walk, timestep_sequence

SAMPLING_METHODS = tuple(SAMPLERS)
DEFAULT_STEPS = {name: s.default_steps for name, s in SAMPLERS.items()}
DEFAULT_SPACING = {name: s.spacing for name, s in SAMPLERS.items()}

__all__ = [
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "LOGSNR_MIN",
    "SAMPLERS",
    "SAMPLING_METHODS",
    "SPACINGS",
    "ModelFn",
    "SamplingRun",
    "ddim_step",
    "ddpm_step",
    "dpmsolver_step",
    "guided_model_fn",
    "randn",
    "resampling_walk",
    "sample",
    "timestep_sequence",
]
