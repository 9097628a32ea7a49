"""Build the .ipynb notebooks from their percent-format sources in notebooks/src/.

    python notebooks/build_notebooks.py            # writes notebooks/<name>.ipynb (no outputs)

Cells are separated by ``# %%`` lines; ``# %% [markdown]`` starts a Markdown cell whose lines are
comments. The sources are what gets reviewed; the .ipynb files are what users open (and what the
results issue commits executed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def parse(source: str) -> nbformat.NotebookNode:
    cells = []
    kind, lines = None, []

    def flush() -> None:
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main(names: list[str]) -> None:
    for src in sorted((HERE / "src").glob("*.py")):
        if names and src.stem not in names:
            continue
        target = HERE / f"{src.stem}.ipynb"
        nbformat.write(parse(src.read_text()), target)
        print(f"wrote {target.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
