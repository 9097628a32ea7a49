"""Shared fixtures: the bundled sample, a tiny model config, isolated cache and run directories."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

# A test suite started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler; the Ctrl-C tests need the interactive default, here and in the
# subprocesses they start (an exec resets handled signals to the default, but keeps ignored ones ignored).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


SMALL_SAMPLE_PER_CLASS = 10
SMALL_SAMPLE_SPLIT = (51, 7, 22)  # train / val / test of the content-hash split at split_seed 0


@pytest.fixture
def small_sample(tmp_path) -> Path:
    """Ten images per class copied from the bundled sample (80 images).

    The content-hash split puts 51 of them in train, 7 in val and 22 in test: 3 training batches of 16
    per epoch, which the resume and pre-emption tests rely on (test_fit_then_predict_round_trip checks it).
    """
    root = tmp_path / "pbc_small"
    for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:SMALL_SAMPLE_PER_CLASS]:
            shutil.copy(f, root / class_dir.name / f.name)
    return root
