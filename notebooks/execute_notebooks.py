"""Execute the notebooks against the shipped weights (weights/README.md) and save them with outputs.

    python notebooks/execute_notebooks.py                          # all three, on ../shared/data/pbc64
    python notebooks/execute_notebooks.py 03_class_conditional --set PER_CLASS=8
    python notebooks/execute_notebooks.py 01_unconditional_diffusion --set CKPT='"runs/x/checkpoints/last.ckpt"'

The models are the sources' defaults, weights/celldiff64.safetensors (one class-conditional inpainting model
that also generates) and weights/judge64.safetensors (the judge), so no training run is needed. Each
notebook is built from its source (notebooks/src/<name>.py), its parameter cell gets the data directory and
the sample counts appended (visible in the saved notebook, so a reader sees what it ran on), and the
executed notebook replaces notebooks/<name>.ipynb. Run it
with OMP_NUM_THREADS=1 on a shared machine: each notebook takes a few minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import build_notebooks  # noqa: E402

WEIGHTS = ("weights/celldiff64.safetensors", "weights/judge64.safetensors")


def parameters(data_dir: str) -> dict[str, dict[str, object]]:
    """What each notebook gets appended to its parameter cell (the models are the sources' defaults)."""
    # No SPLIT_FILE: the data module's default content-hash split (seed 0) of pbc64 is the shipped model's.
    return {
        "01_unconditional_diffusion": {"DATA_DIR": data_dir, "NUM_SAMPLES": 64},
        "02_Inpainting_Diffusion": {"DATA_DIR": data_dir, "NUM_CELLS": 16},
        "03_class_conditional": {"DATA_DIR": data_dir, "PER_CLASS": 6},
    }


def parse_set(items: list[str]) -> dict[str, object]:
    """``NAME=VALUE`` pairs, each VALUE a Python literal (``--set CKPT=None``, ``--set NUM_SAMPLES=16``)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            sys.exit(f"execute_notebooks: --set {item}: expected NAME=VALUE")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sys.exit(f"execute_notebooks: --set {item}: VALUE must be a Python literal (quote strings: NAME='\"text\"')")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--data-dir", default="../shared/data/pbc64",
                        help="the cells (relative to the repository): pbc64 holds the shipped model's test split")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="one more parameter for every notebook run (repeatable), e.g. CKPT=None to train the demo")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    params = parameters(args.data_dir)
    unknown = [n for n in args.names if n not in params]
    if unknown:
        sys.exit(f"execute_notebooks: no notebook {unknown[0]}; expected one of {', '.join(params)}")
    missing = [p for p in (*WEIGHTS, args.data_dir) if not (REPO / p).exists()]
    if missing:
        sys.exit(f"execute_notebooks: {missing[0]} is missing (the shipped weights are in git; the data: see README)")
    extra = parse_set(args.overrides)
    for name in args.names or list(params):
        path = HERE / f"{name}.ipynb"
        nb = build_notebooks.parse((HERE / "src" / f"{name}.py").read_text())  # from the source: no stale outputs
        first = next(c for c in nb.cells if c.cell_type == "code")
        lines = [f"{key} = {value!r}" for key, value in {**params[name], **extra}.items()]
        first.source += "\n# Executed by notebooks/execute_notebooks.py against the shipped weights:\n" + "\n".join(lines)
        start = time.perf_counter()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
        nbformat.write(nb, path)
        print(f"executed {path.relative_to(REPO)} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
