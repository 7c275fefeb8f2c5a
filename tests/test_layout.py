"""The house rules that keep the code easy to change, read off the source (no imports of it):

- no module in fxpass/, surgery/, targets/ or bench/ over 450 lines, no function over 80 lines;
- no import cycle anywhere in those packages, counting imports made inside functions too;
- lowering never imports the sampler (the step graph takes its maths from fxpass/diffusion.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fxpass", "surgery", "targets", "bench")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _targets(module: str, path: Path, node: ast.AST, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that an import statement in ``module`` loads (a package's own
    ``from . import sub`` loads ``sub``, not the package again)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = _modules(root)
    graph = {}
    for name, path in known.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _targets(name, path, node, known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def too_long(root: Path = ROOT) -> list[str]:
    out = []
    for name, path in _modules(root).items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(root)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines")
    return out


def test_modules_and_functions_are_small():
    assert too_long() == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_lowering_never_imports_the_sampler():
    graph = import_graph()
    for start in ("fxpass.pipeline", "fxpass.step_graph"):
        assert "fxpass.sampler" not in reaches(graph, start) | {start}, start
    assert "fxpass.diffusion" in graph["fxpass.step_graph"]


# ---- the checkers themselves must be able to fail --------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    return tmp_path


def test_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    root = _tree(tmp_path, {"fxpass/__init__.py": "", "fxpass/a.py": "from . import b\n",
                            "fxpass/b.py": "def f():\n    from .a import x\n", "fxpass/c.py": "from .a import y\n"})
    assert cycles(import_graph(root)) == [["fxpass.a", "fxpass.b"]]


def test_checker_ignores_a_package_importing_its_own_submodules(tmp_path):
    root = _tree(tmp_path, {"fxpass/__init__.py": "from . import sub\n", "fxpass/sub.py": "from . import other\n",
                            "fxpass/other.py": "import os\n"})
    assert cycles(import_graph(root)) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("x = 1\n" * 451, "fxpass/big.py: 451 lines"),
    ("def f():\n" + "    x = 1\n" * 80, "fxpass/big.py:1 f: 81 lines"),
])
def test_checker_finds_long_modules_and_functions(tmp_path, text, expected):
    root = _tree(tmp_path, {"fxpass/__init__.py": "", "fxpass/big.py": text})
    assert too_long(root) == [expected]


def test_checker_passes_the_limits_exactly(tmp_path):
    root = _tree(tmp_path, {"fxpass/__init__.py": "", "fxpass/ok.py": "def f():\n" + "    x = 1\n" * 79})
    assert too_long(root) == []
