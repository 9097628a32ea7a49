"""TRANSITIONAL: removed by D. The non-learned inpainting fills moved to ``celldiff.evaluation.baselines``."""

# TRANSITIONAL: removed by D (importers: celldiff.cli, scripts/results_figures.py, notebooks/02_Inpainting_Diffusion).
from celldiff.evaluation.baselines import BASELINES, FillBaseline, blur_fill, mean_fill  # noqa: F401
