"""The notebooks run top to bottom (slow: CI runs them through `make test-slow`).

By default they use the shipped weights (weights/*.safetensors); the slow tests run them on a tiny
exported weights file of the same kind (a class-conditional inpainting model trained with 'full' masks,
and a classifier), and on the fallback that trains the demo configs (every model parameter None).
"""

from __future__ import annotations

import ast
import shutil
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.cli.helpers import _plain_argv, run_cli  # noqa: F401 (an autouse fixture)
from tests.conftest import REPO, SAMPLE, TINY_MODEL_ARGS

sys.path.insert(0, str(REPO / "notebooks"))
import build_notebooks  # noqa: E402
import execute_notebooks  # noqa: E402

NAMES = ["01_unconditional_diffusion", "02_Inpainting_Diffusion", "03_class_conditional"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def execute(name: str, parameters: str, tmp_path) -> nbformat.NotebookNode:
    """Execute notebooks/<name>.ipynb with ``parameters`` appended to its parameter cell."""
    # From the source, not the committed .ipynb: that one is executed against the results checkpoints.
    nb = build_notebooks.parse((REPO / "notebooks" / "src" / f"{name}.py").read_text())
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    code_cells[0].source += "\n" + parameters
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[list, str, int]:
    """(every output, the printed text, the number of figures) of an executed notebook; no cell failed."""
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    return outs, text, len([o for o in outs if "image/png" in o.get("data", {})])


def default_parameters(name: str) -> dict[str, object]:
    """The parameter cell of a notebook's source, run on its own (plain assignments of literals)."""
    cell = next(c for c in build_notebooks.parse((REPO / "notebooks" / "src" / f"{name}.py").read_text()).cells
                if c.cell_type == "code")  # fmt: skip
    namespace: dict[str, object] = {}
    exec(compile(ast.parse(cell.source), name, "exec"), namespace)  # noqa: S102 (the repository's own source)
    return {k: v for k, v in namespace.items() if k.isupper()}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_defaults_are_the_shipped_weights(name):
    """Every model parameter defaults to a weights file in weights/ that exists (no run needed)."""
    params = default_parameters(name)
    models = {k: v for k, v in params.items() if k == "CKPT" or k.endswith("_CKPT")}
    assert models
    for key, value in models.items():
        assert isinstance(value, str) and value.startswith("weights/") and value.endswith(".safetensors"), (key, value)
        assert (REPO / value).is_file(), (key, value)
    assert set(models.values()) <= {"weights/celldiff64.safetensors", "weights/judge64.safetensors"}
    assert params["SAMPLER"] == "dpmsolver"  # the shipped model's fast sampler, not DDPM's 1,000 steps


def test_execute_notebooks_defaults():
    """The executor runs every notebook on pbc64 against the sources' defaults (no checkpoint of a run)."""
    params = execute_notebooks.parameters("../shared/data/pbc64")
    assert sorted(params) == NAMES
    for name, values in params.items():
        assert values["DATA_DIR"] == "../shared/data/pbc64"
        assert not [k for k in values if k.endswith("CKPT")], name
        assert set(values) <= set(default_parameters(name)), name
    assert all((REPO / path).is_file() for path in execute_notebooks.WEIGHTS)
    assert execute_notebooks.parse_set(["CKPT=None", "NUM_SAMPLES=8"]) == {"CKPT": None, "NUM_SAMPLES": 8}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Tiny weights files like the shipped ones: a class-conditional inpainting model with 'full' masks, a judge."""
    from celldiff.training.weights import export_weights

    root = tmp_path_factory.mktemp("tiny_weights")
    common = ["--data.data_dir", str(SAMPLE), "--trainer.max_steps", "2", "--trainer.callbacks", "[]", *QUIET]
    runs = {
        "model": [str(REPO / "configs" / "demo_phase3_inpaint.yaml"), "--data.batch_size", "16",
                  "--data.masks", "{box: 1, nucleus: 1, full: 1}", *TINY_MODEL_ARGS],
        "judge": [str(REPO / "configs" / "demo_classifier.yaml"), "--data.batch_size", "16", "--data.image_size", "16",
                  "--model.width", "4", "--model.feature_dim", "16"],
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's function-scoped isolation is not active yet
        mp.setenv("CELLDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "celldiff-cache"))
        mp.setenv("CELLDIFF_RUN_DIR", "")
        mp.setattr(sys, "argv", ["celldiff"])
        for name, (config, *extra) in runs.items():
            run_cli(["fit", "--config", config, "--run_dir", str(root / name), *common, *extra], root)
            export_weights(root / name / "checkpoints" / "last.ckpt", root / f"{name}.safetensors")
    for name in runs:
        shutil.rmtree(root / name)  # no metrics.csv or checkpoint next to the files: as in weights/
    return {"model": str(root / "model.safetensors"), "judge": str(root / "judge.safetensors")}


@pytest.mark.slow
def test_notebook_01_on_a_weights_file(tiny_weights, tmp_path):
    params = f"CKPT = {tiny_weights['model']!r}\nSAMPLING_STEPS = 4\nNUM_SAMPLES = 4\n"
    _, text, figures = outputs(execute("01_unconditional_diffusion", params, tmp_path))
    assert "holds no training log" in text  # the loss-curve cell says so and goes on
    assert "the samples below use the null class" in text and "observe nothing" in text
    assert figures >= 5  # forward process, schedules, samples, real, reverse strip


@pytest.mark.slow
def test_notebook_02_on_a_weights_file(tiny_weights, tmp_path):
    model = tiny_weights["model"]
    params = f"INPAINT_CKPT = {model!r}\nPHASE1_CKPT = {model!r}\nSAMPLING_STEPS = 4\nNUM_CELLS = 4\n"
    _, text, figures = outputs(execute("02_Inpainting_Diffusion", params, tmp_path))
    assert "used blind (nothing observed, null class)" in text
    for method in ("celldiff inpainting", "replacement only", "mean fill"):
        assert text.count(method) == 6  # one row per mask family
    assert figures >= 5


@pytest.mark.slow
def test_notebook_03_on_a_weights_file(tiny_weights, tmp_path):
    model = tiny_weights["model"]
    params = (
        f"CLASS_CKPT = {model!r}\nINPAINT_CKPT = {model!r}\nCLASSIFIER_CKPT = {tiny_weights['judge']!r}\n"
        "SAMPLING_STEPS = 4\nPER_CLASS = 2\nREAL_PER_CLASS = 4\n"
    )
    _, text, figures = outputs(execute("03_class_conditional", params, tmp_path))
    assert "(the same model)" in text
    assert text.count("guidance: ") == 4
    assert "guidance 0 (null class), the judge's labels" in text
    assert figures >= 4  # guidance panels, same noise, counterfactual grid, fidelity


@pytest.mark.slow
def test_notebook_01_trains_demo_when_no_checkpoint(tmp_path):
    overrides = [*TINY_MODEL_ARGS, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"]
    params = (
        f"CKPT = None\nDEMO_RUN_DIR = {str(tmp_path / 'run')!r}\nDEMO_OVERRIDES = {overrides!r}\n"
        "SAMPLING_STEPS = 5\nNUM_SAMPLES = 4\n"
    )
    _, text, figures = outputs(execute("01_unconditional_diffusion", params, tmp_path))
    assert "checkpoint: " in text and "no metrics.csv" not in text
    assert figures >= 6  # forward process, schedules, loss, samples, real, reverse strip


@pytest.mark.slow
def test_notebook_02_trains_demos_when_no_checkpoint(tmp_path):
    overrides = [*TINY_MODEL_ARGS, "--trainer.max_epochs", "1", "--trainer.callbacks.steps", "3"]
    params = (
        f"INPAINT_CKPT = None\nPHASE1_CKPT = None\nDEMO_RUN_ROOT = {str(tmp_path / 'runs')!r}\n"
        f"DEMO_OVERRIDES = {overrides!r}\nSAMPLING_STEPS = 4\nNUM_CELLS = 4\n"
    )
    _, text, figures = outputs(execute("02_Inpainting_Diffusion", params, tmp_path))
    assert "used blind" not in text  # the demo Phase 1 model is unconditional: replacement in generate()
    for method in ("celldiff inpainting", "replacement only", "mean fill"):
        assert text.count(method) == 6  # one row per mask family
    assert figures >= 5


@pytest.mark.slow
def test_notebook_03_trains_demos_when_no_checkpoint(tmp_path):
    overrides = [*TINY_MODEL_ARGS, "--trainer.max_epochs", "1", "--trainer.callbacks.steps", "3"]
    params = (
        f"CLASS_CKPT = None\nINPAINT_CKPT = None\nCLASSIFIER_CKPT = None\nDEMO_RUN_ROOT = {str(tmp_path / 'runs')!r}\n"
        f"DEMO_OVERRIDES = {overrides!r}\nSAMPLING_STEPS = 4\nPER_CLASS = 2\nREAL_PER_CLASS = 4\n"
        f"CLASSIFIER_OVERRIDES = {['--trainer.max_epochs', '1', '--data.image_size', '16', '--model.width', '8']!r}\n"
    )
    _, text, figures = outputs(execute("03_class_conditional", params, tmp_path))
    assert figures >= 4
    assert text.count("guidance: ") == 4


@pytest.mark.parametrize("name", NAMES)
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
