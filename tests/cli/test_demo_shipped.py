"""The shipped model's part of ``make demo`` (scripts/demo_shipped.sh): the class grid and a nucleus inpainting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "demo_shipped.sh"


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    celldiff = Path(sys.executable).parent / "celldiff"
    environment = {**os.environ, "CELLDIFF": str(celldiff), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=environment, capture_output=True, text=True, timeout=600)


def test_make_demo_ends_with_the_shipped_models_script():
    demo = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "bash scripts/demo_shipped.sh $$RUN" in demo


def test_without_the_weights_file_the_demo_says_so_and_succeeds(tmp_path):
    done = _run(tmp_path / "out", SHIPPED=str(tmp_path / "absent.safetensors"), CELLDIFF="/nonexistent/celldiff")
    assert done.returncode == 0, done.stderr
    assert "the shipped model's grids are skipped" in done.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_shipped_model_draws_each_class_and_inpaints_a_nucleus(tmp_path):
    if not (REPO / "weights" / "celldiff64.safetensors").is_file():
        pytest.skip("no weights/celldiff64.safetensors in this checkout")
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    classes, nucleus = tmp_path / "shipped_classes" / "grid.png", tmp_path / "shipped_nucleus" / "grid.png"
    assert f"four cells of each class:        {classes}" in done.stdout
    assert f"a test cell, nucleus inpainted:  {nucleus}" in done.stdout
    with Image.open(classes) as grid:
        width, height = grid.size
    assert width >= 4 * 64 and height >= 8 * 64  # eight classes of four 64 px cells
    assert len(list((tmp_path / "shipped_classes").rglob("*.png"))) >= 33  # the 32 cells and the grid
    with Image.open(nucleus) as grid:
        assert grid.size[0] >= 6 * 64  # masked input | 4 samples | original
