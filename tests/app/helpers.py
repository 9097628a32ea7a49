"""A tiny inpainting, class-conditional model saved as a checkpoint, for the app's tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from celldiff.app.model import AppModel, load_model
from tests.training.helpers import tiny_module

CLASS_NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
TINY_APP = dict(inpainting=True, class_conditional=True, num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES,
                num_timesteps=50)  # fmt: skip


def tiny_checkpoint(path: Path, **overrides) -> Path:
    """Save a tiny (random-weights) DiffusionModule as a Lightning-style checkpoint at ``path``."""
    module = tiny_module(**{**TINY_APP, **overrides})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return path


def tiny_app_model(tmp_path: Path, **overrides) -> AppModel:
    """The tiny model as the app loads it (``celldiff.app.model.load_model``)."""
    return load_model(tiny_checkpoint(tmp_path / "tiny.ckpt", **overrides))
