"""Execute the notebooks against the results checkpoints (docs/results.md) and save them with outputs.

    python notebooks/execute_notebooks.py                 # all three, checkpoints under runs/results/
    python notebooks/execute_notebooks.py 02_Inpainting_Diffusion --runs /path/to/runs/results

Each notebook's parameter cell gets the checkpoint paths appended (visible in the saved notebook, so
a reader sees what it ran on); the executed notebook replaces notebooks/<name>.ipynb. The runs are
the ones docs/results.md lists (configs/results/*.yaml); checkpoints stay out of git.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def parameters(runs: Path, data_dir: str, phase1_run: str = "phase1") -> dict[str, dict[str, object]]:
    ckpt = {name: str(runs / name / "checkpoints" / "last.ckpt") for name in ("phase1", "phase2", "phase3", "classifier")}
    split = str(runs / "phase1" / "split.json")  # every results run uses the same split (same data, same seed)
    notebook01_ckpt = str(runs / phase1_run / "checkpoints" / "last.ckpt")
    return {
        "01_unconditional_diffusion": {"CKPT": notebook01_ckpt, "DATA_DIR": data_dir, "NUM_SAMPLES": 64},
        "02_Inpainting_Diffusion": {
            "INPAINT_CKPT": ckpt["phase2"],
            "PHASE1_CKPT": ckpt["phase1"],
            "DATA_DIR": data_dir,
            "SPLIT_FILE": split,
            "NUM_CELLS": 16,
        },
        "03_class_conditional": {
            "CLASS_CKPT": ckpt["phase3"],
            "INPAINT_CKPT": ckpt["phase3"],  # no class-conditional inpainting run: replacement with the Phase 3 model
            "CLASSIFIER_CKPT": ckpt["classifier"],
            "DATA_DIR": data_dir,
            "SPLIT_FILE": split,
            "EVAL_SAMPLES": 32,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--runs", type=Path, default=Path("runs/results"), help="results runs (relative to the repository)")
    parser.add_argument("--data-dir", default="../shared/data/pbc64", help="the data the runs were trained on")
    parser.add_argument("--phase1-run", default="phase1",
                        help="the run notebook 01 shows: phase1 (32 px, 1.2 M) or phase1_64 (64 px, 11 M)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    params = parameters(args.runs, args.data_dir, args.phase1_run)
    for name in args.names or list(params):
        missing = [v for v in params[name].values() if str(v).endswith(".ckpt") and not (REPO / str(v)).is_file()]
        if missing:
            sys.exit(f"execute_notebooks: {name} needs {missing[0]}; train it first (docs/results.md)")
        path = HERE / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        lines = [f"{key} = {value!r}" for key, value in params[name].items()]
        first.source += "\n# Executed for docs/results.md against the results runs:\n" + "\n".join(lines)
        start = time.perf_counter()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
        nbformat.write(nb, path)
        print(f"executed {path.relative_to(REPO)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
