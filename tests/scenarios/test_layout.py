"""The folders import downward, as the README's layout table says, and no modules import each other; the
tests are laid out like the code."""
import ast

import pytest
from helpers import ROOT

PACKAGES = ("model", "data", "trainer", "launch")
MAY_IMPORT = {"model": {"model"}, "data": {"data"}, "trainer": {"trainer", "model", "data"},
              "launch": set(PACKAGES)}
# late-import cycles still to break (each a function-level import that closes a loop)
KNOWN_CYCLES = []


def _modules() -> dict[str, ast.Module]:
    return {(f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg): ast.parse(path.read_text())
            for pkg in PACKAGES for path in sorted((ROOT / pkg).glob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project's modules `name` imports, at the top or inside functions."""
    package = name if name in PACKAGES else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            base = ".".join(filter(None, [base, node.module or ""]))
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in out if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)
    for v in graph:
        if v not in index:
            visit(v)
    return found


GRAPH = {name: _imports(name, tree, set(_modules())) for name, tree in _modules().items()}


def test_no_module_cycles():
    assert [c for c in _cycles(GRAPH) if c not in KNOWN_CYCLES] == []


@pytest.mark.parametrize("package", PACKAGES)
def test_a_folder_imports_only_the_folders_below_it(package):
    upward = {(name, other) for name, others in GRAPH.items() if name.split(".")[0] == package
              for other in others if other.split(".")[0] not in MAY_IMPORT[package]}
    assert upward == set()


def test_each_test_file_sits_in_the_folder_of_the_package_it_tests_or_with_the_scenarios():
    """tests/model, tests/data, tests/trainer, tests/launch mirror the packages; tests/scenarios holds the
    end-to-end runs; nothing else holds a test file, and no two test files share a name (pytest imports
    them by name)."""
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    folders = {p.parent.relative_to(ROOT / "tests").as_posix() for p in tests}
    assert folders == {*PACKAGES, "scenarios"}, folders
    names = [p.name for p in tests]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)


def test_every_test_the_docs_name_exists_where_they_say():
    """docs/*.md and the README point at tests as `tests/FOLDER/test_x.py::test_name` (a name may wrap
    onto the next line after `::`): each such file holds a test function of that name."""
    import re

    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path, name in re.findall(r"(tests/[\w/]+\.py)::\s*(test_\w+)", text):
            source = ROOT / path
            defined = source.is_file() and re.search(rf"^def {name}\(", source.read_text(), re.M)
            if not defined:
                missing.append(f"{doc.name}: {path}::{name}")
    assert not missing, "\n".join(missing)
