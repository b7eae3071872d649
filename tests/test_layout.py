"""The model layer's layout: imports point one way (runs -> data, lora, hf -> models ->
recon_kernels), with no circle between the files of a layer, and files stay small."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "python_models")
# what each part may import of python_models (besides itself)
ALLOWED = {
    "models": set(),
    "data": set(),
    "lora": set(),
    "hf": {"models"},
    "runs": {"models", "data", "lora", "hf"},
}


def _part(path: str) -> str:
    rel = os.path.relpath(path, PKG).split(os.sep)
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _module(path: str) -> str:
    rel = os.path.relpath(path, ROOT).removesuffix(".py").replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _imports(path: str) -> list[str]:
    """Absolute names of the python_models modules ``path`` imports (lazy ones too)."""
    tree = ast.parse(open(path).read())
    pkg = _module(path).rsplit(".", 1)[0] if not path.endswith("__init__.py") else _module(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" for a in node.names] if not node.module else [name]
            out += [n for n in names if n.startswith("python_models")]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("python_models")]
    return out


def _files() -> list[str]:
    return sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(PKG)
        for f in fs
        if f.endswith(".py") and f not in ("__init__.py", "__main__.py")
    )


@pytest.mark.parametrize("path", _files(), ids=lambda p: os.path.relpath(p, PKG))
def test_imports_point_one_way(path):
    part = _part(path)
    for name in _imports(path):
        target = name.split(".")[1] if name.count(".") else ""
        if target in ("", part) or target not in ALLOWED:
            continue
        assert target in ALLOWED[part], (
            f"{os.path.relpath(path, ROOT)} imports {name}: {part} may import only "
            f"{sorted(ALLOWED[part]) or 'nothing'} of python_models"
        )


def test_no_import_cycles_between_files():
    graph = {_module(p): {n for n in _imports(p)} for p in _files()}
    mods = set(graph)
    graph = {m: {t for t in ts if t in mods} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, t]))
            if t not in state:
                visit(t, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("path", _files(), ids=lambda p: os.path.relpath(p, PKG))
def test_files_stay_small(path):
    n = sum(1 for _ in open(path))
    assert n <= 520, f"{os.path.relpath(path, ROOT)}: {n} lines, expected at most ~500"
