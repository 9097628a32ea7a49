"""Shared fixtures: the bundled sample, a tiny model config, isolated cache and run directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "pbc_sample"

os.environ.setdefault("WANDB_MODE", "disabled")
# Tests use tiny models, for which one thread is fastest, and CI shares 2 cores between processes.
torch.set_num_threads(1)

# Smallest model the CLI tests train: a few seconds per run on 2 CPU cores.
TINY_MODEL_ARGS = [
    "--model.base_channels", "8",
    "--model.channel_mult", "[1, 2]",
    "--model.num_res_blocks", "1",
    "--model.attention_resolutions", "[8]",
    "--model.num_heads", "2",
    "--model.num_timesteps", "50",
    "--model.warmup_steps", "2",
    "--data.image_size", "16",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session decodes into its own cache directory, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "celldiff-cache"
    monkeypatch.setenv("CELLDIFF_CACHE_DIR", str(cache))
    # The CLI exports the run directory for its DDP children; an in-process run must not leak it.
    monkeypatch.setenv("CELLDIFF_RUN_DIR", "")


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture
def small_sample(tmp_path) -> Path:
    """Eight images per class copied from the bundled sample (64 images)."""
    root = tmp_path / "pbc_small"
    for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:8]:
            shutil.copy(f, root / class_dir.name / f.name)
    return root
