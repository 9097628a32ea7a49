"""TRANSITIONAL: removed by D. The masked-region metrics moved to ``celldiff.evaluation.masked``."""

# TRANSITIONAL: removed by D (importers: celldiff.callbacks, tests/test_inpainting.py, notebooks/02_Inpainting_Diffusion).
from celldiff.evaluation.masked import (  # noqa: F401
    boundary_ring,
    inpainting_metrics,
    masked_mse,
    masked_psnr,
    masked_ssim,
    seam_score,
)
