"""The package's shape: imports run down the layers, no import circle, files a reader can hold in their head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "celldiff"

# Lower numbers are lower layers; a module may import its own subpackage and anything below its layer.
LAYERS = {
    "errors": 0, "seeds": 0, "images": 0,
    "masks": 1, "nets": 1, "diffusion": 1,
    "data": 2,
    "evaluation": 3, "training": 3,
    "app": 4,  # celldiff app: the browser page; the CLI dispatches to it
    "cli": 5,
}  # fmt: skip
ALSO_ALLOWED = {("training", "evaluation")}  # callbacks log the evaluation's masked-region metrics
DEPRECATED_SHIMS = {"celldiff.module", "celldiff.classifier", "celldiff.callbacks"}  # old class_path values
MAX_FILE_LINES = 450
MAX_CLASS_LINES = {"DiffusionModule": 300, "CellDiffCLI": 300}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every celldiff module ``name`` imports, lazy imports inside functions included."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("celldiff")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("celldiff"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_only_run_down_the_layers():
    wrong = []
    for name, path in _modules().items():
        if name in DEPRECATED_SHIMS or name == "celldiff":
            continue
        mine = _top(name)
        for target in _imports(name, path):
            theirs = _top(target)
            if target in DEPRECATED_SHIMS:
                wrong.append(f"{name} imports the deprecated {target}")
            elif theirs == mine or (mine, theirs) in ALSO_ALLOWED:
                continue
            elif LAYERS.get(theirs, 99) >= LAYERS.get(mine, -1):
                wrong.append(f"{name} (layer {LAYERS.get(mine)}) imports {target} (layer {LAYERS.get(theirs)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {name: _imports(name, path) for name, path in _modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_files_and_classes_fit_in_a_head():
    long_files = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]  # fmt: skip
    assert not long_files, long_files
    seen = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in MAX_CLASS_LINES:
                seen[node.name] = node.end_lineno - node.lineno + 1
    for cls, limit in MAX_CLASS_LINES.items():
        assert cls in seen and seen[cls] <= limit, (cls, seen.get(cls), limit)
