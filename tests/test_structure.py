"""The package's shape, checked like behaviour: no import cycles (lazy imports included), no private name
imported across modules, no module over 400 lines, no pipeline function over 80 lines, and each room's
`__init__` says what it is. Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peakllm"
ROOMS = ("calibrate", "cli", "data", "eval", "formats", "kernels", "models", "plan", "recover", "runtime", "serve",
         "solvers")
MAX_MODULE_LINES = 400
MAX_PIPELINE_FUNCTION_LINES = 80


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Imports under `if TYPE_CHECKING:` run only for type checkers: not edges at run time."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in the file, nested ones included."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None) if sub in known else (base, a.name))
    out = []
    for target, imported in found:
        while target not in known and "." in target:
            target = target.rpartition(".")[0]
        if target in known and target != name:
            out.append((target, imported))
    return out


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(root)
    return {name: {t for t, _ in imports(name, path, known)} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "peakllm"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from peakllm.b import g  # lazy: still an edge\n")
    (pkg / "b.py").write_text("from peakllm.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from peakllm.b import g\n")
    (pkg / "d.py").write_text("from . import c\n")
    found = cycles(graph(pkg))
    assert found == [["peakllm.a.x", "peakllm.b"]]
    assert graph(pkg)["peakllm.c"] == set()  # TYPE_CHECKING imports are not run-time edges
    assert graph(pkg)["peakllm.d"] == {"peakllm.c"}  # relative imports resolve


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_private_names_imported_across_modules():
    known = modules()
    private = [f"{name} imports {imported} from {target}" for name, path in known.items()
               for target, imported in imports(name, path, known)
               if imported and imported.startswith("_") and not imported.startswith("__")]
    assert private == []


def test_no_module_over_the_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_pipeline_function_over_the_limit():
    long = {}
    for path in sorted((PACKAGE / "calibrate").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_PIPELINE_FUNCTION_LINES:
                    long[f"{path.name}:{node.name}"] = length
    assert long == {}


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_says_what_it_is(room):
    init = PACKAGE / room / "__init__.py"
    assert init.is_file(), f"{room}/ is not a package"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 8, f"{room}/__init__.py has no docstring saying what the room is"


def test_top_level_holds_only_shared_leaves():
    """Everything else lives in a room; the loose modules are the leaves every room may import."""
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__", "__main__", "errors", "memory", "paths", "progress"]
