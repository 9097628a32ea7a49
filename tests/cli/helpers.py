"""Running the ``celldiff`` command line from tests: in-process, as a subprocess, a tiny fit's arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from celldiff.cli import main
from tests.conftest import REPO, TINY_MODEL_ARGS


def run_cli(args: list[str], cwd: Path) -> None:
    """Run the CLI in-process from ``cwd`` (run directories are relative to it)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        main(args)
    finally:
        os.chdir(old)


def run_subprocess(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # tests.* callbacks
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-m", "celldiff.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def fit_args(sample: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--data.data_dir", str(sample),
        "--data.batch_size", "16",
        "--run_dir", str(run_dir),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.callbacks+=celldiff.training.callbacks.SampleGrid",
        "--trainer.callbacks.every_n_epochs", "1",
        "--trainer.callbacks.num_samples", "4",
        "--trainer.callbacks.steps", "3",
        *TINY_MODEL_ARGS,
        *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """Import it into a test module to make it autouse there: the CLI never sees pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["celldiff"])
