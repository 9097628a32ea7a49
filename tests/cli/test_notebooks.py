"""The notebooks run top to bottom (slow: CI runs them through `make test-slow`)."""

from __future__ import annotations

import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO, TINY_MODEL_ARGS

sys.path.insert(0, str(REPO / "notebooks"))
import build_notebooks  # noqa: E402


def execute(name: str, parameters: str, tmp_path) -> nbformat.NotebookNode:
    """Execute notebooks/<name>.ipynb with ``parameters`` appended to its parameter cell."""
    # From the source, not the committed .ipynb: that one is executed against the results checkpoints.
    nb = build_notebooks.parse((REPO / "notebooks" / "src" / f"{name}.py").read_text())
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    code_cells[0].source += "\n" + parameters
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()
    nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")
    return nb


@pytest.mark.slow
def test_notebook_01_trains_demo_when_no_checkpoint(tmp_path):
    overrides = [*TINY_MODEL_ARGS, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"]
    params = f"DEMO_RUN_DIR = {str(tmp_path / 'run')!r}\nDEMO_OVERRIDES = {overrides!r}\nSAMPLING_STEPS = 5\nNUM_SAMPLES = 4\n"
    nb = execute("01_unconditional_diffusion", params, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # forward process, schedules, loss, samples, real, reverse strip


@pytest.mark.slow
def test_notebook_02_inpainting(tmp_path):
    overrides = [*TINY_MODEL_ARGS, "--trainer.max_epochs", "1", "--trainer.callbacks.steps", "3"]
    params = (
        f"DEMO_RUN_ROOT = {str(tmp_path / 'runs')!r}\nDEMO_OVERRIDES = {overrides!r}\n"
        "SAMPLING_STEPS = 4\nNUM_CELLS = 4\n"
    )
    nb = execute("02_Inpainting_Diffusion", params, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for method in ("celldiff inpainting", "phase 1 + replacement", "mean fill"):
        assert text.count(method) == 6  # one row per mask family
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 5


@pytest.mark.slow
def test_notebook_03_class_conditional(tmp_path):
    overrides = [*TINY_MODEL_ARGS, "--trainer.max_epochs", "1", "--trainer.callbacks.steps", "3"]
    params = (
        f"DEMO_RUN_ROOT = {str(tmp_path / 'runs')!r}\nDEMO_OVERRIDES = {overrides!r}\n"
        "SAMPLING_STEPS = 4\nPER_CLASS = 2\nEVAL_SAMPLES = 16\n"
        f"CLASSIFIER_OVERRIDES = {['--trainer.max_epochs', '1', '--data.image_size', '16', '--model.width', '8']!r}\n"
    )
    nb = execute("03_class_conditional", params, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("guidance: ") == 4


@pytest.mark.parametrize("name", ["01_unconditional_diffusion", "02_Inpainting_Diffusion", "03_class_conditional"])
def test_committed_notebook_matches_its_source(name):
    """The .ipynb (possibly executed, with parameters appended to its first code cell) is its source."""
    committed = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    source = build_notebooks.parse((REPO / "notebooks" / "src" / f"{name}.py").read_text())
    assert [c.cell_type for c in committed.cells] == [c.cell_type for c in source.cells]
    first = True
    for got, want in zip(committed.cells, source.cells, strict=True):
        if got.cell_type == "code" and first:
            assert got.source.startswith(want.source)
            first = False
        else:
            assert got.source == want.source
