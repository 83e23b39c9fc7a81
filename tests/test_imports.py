"""No import cycles in poolformer and poolformer_cli, counting the imports inside functions.

The graph is read from the source files with `ast` (nothing is imported), so it holds on any tree. Two views:
- modules: `from .x import y` is an edge to module `x` (or to `x.y` where that is a module), and to every package
  Python has to import on the way that is not already an ancestor of the importer;
- packages: within each package, its direct children (modules and subpackages, a subpackage standing for
  everything under it) with an edge where anything in one imports anything in the other. A cycle here is two
  parts of the package that each need the other, even where no single chain of modules loops.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("poolformer", "poolformer_cli")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages; a package is its
    __init__.py."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _absolute(importer: str, files: dict[str, Path], level: int, module: str | None) -> str:
    """The absolute name of a (possibly relative) `from` import's module."""
    if level == 0:
        return module or ""
    package = importer if _is_package(importer, files) else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _with_packages(target: str, importer: str, files: dict[str, Path]) -> set[str]:
    """`target` and each package Python imports on the way to it, except the importer's own ancestors (they are
    being imported already when the importer runs)."""
    parts = target.split(".")
    names = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    ancestors = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    if _is_package(importer, files):
        ancestors.add(importer)
    return {n for n in names if n in files and (n == target or n not in ancestors)}


def imports_of(importer: str, files: dict[str, Path]) -> set[str]:
    """The modules of `files` that `importer` imports, anywhere in its file (functions included)."""
    tree = ast.parse(files[importer].read_text(), filename=str(files[importer]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_packages(alias.name, importer, files)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(importer, files, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found |= _with_packages(sub if sub in files else base, importer, files)
    found.discard(importer)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = module_files(root, packages)
    return {name: imports_of(name, files) for name in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first, in sorted order, so the answer is stable."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def package_graphs(graph: dict[str, set[str]]) -> dict[str, dict[str, set[str]]]:
    """For each package, the graph of its direct children, each standing for itself and everything under it."""
    packages = {name.rpartition(".")[0] for name in graph if "." in name}
    views: dict[str, dict[str, set[str]]] = {}
    for package in sorted(packages):
        prefix = package + "."

        def child(name: str) -> str | None:
            return prefix + name[len(prefix):].split(".")[0] if name.startswith(prefix) else None

        view: dict[str, set[str]] = {}
        for importer, targets in graph.items():
            source = child(importer)
            if source is None:
                continue
            edges = view.setdefault(source, set())
            edges |= {c for c in map(child, targets) if c is not None and c != source}
        views[package] = view
    return views


def cycles(root: Path, packages: tuple[str, ...]) -> list[str]:
    """Every view's cycle, as 'a -> b -> a' lines (at most one per view)."""
    graph = import_graph(root, packages)
    found = []
    cycle = find_cycle(graph)
    if cycle:
        found.append("modules: " + " -> ".join(cycle))
    for package, view in package_graphs(graph).items():
        cycle = find_cycle(view)
        if cycle:
            found.append(f"inside {package}: " + " -> ".join(cycle))
    return found


def test_no_import_cycles():
    assert cycles(ROOT, PACKAGES) == []


def test_the_graph_sees_the_imports_it_must():
    """Function-level, relative and `from . import x` imports all count (a walker that misses them passes)."""
    graph = import_graph(ROOT, PACKAGES)
    assert "poolformer.errors" in graph["poolformer.model"]
    assert "poolformer.bench" in graph["poolformer_cli.bench"]  # inside the command function
    assert len(graph) > 30 and all(name.startswith(PACKAGES) for name in graph)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .c import thing\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from .a import nothing\n",
    })
    assert cycles(tmp_path, ("pkg",)) == ["modules: pkg.a -> pkg.b -> pkg.c -> pkg.a",
                                          "inside pkg: pkg.a -> pkg.b -> pkg.c -> pkg.a"]


def test_a_cycle_between_subpackages_is_found(tmp_path):
    """sub1.x -> sub2.y and sub2.z -> sub1.w: no module loop, but sub1 and sub2 need each other."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub1/__init__.py": "", "pkg/sub1/x.py": "from ..sub2.y import f\n", "pkg/sub1/w.py": "",
        "pkg/sub2/__init__.py": "", "pkg/sub2/y.py": "", "pkg/sub2/z.py": "from ..sub1 import w\n",
    })
    assert cycles(tmp_path, ("pkg",)) == ["inside pkg: pkg.sub1 -> pkg.sub2 -> pkg.sub1"]


def test_a_package_importing_its_own_modules_is_no_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom . import b\n",
        "pkg/a.py": "from .b import g\nimport pkg\n",
        "pkg/b.py": "from pkg.c import h\n",
        "pkg/c.py": "",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b", "pkg"} and graph["pkg.b"] == {"pkg.c"}
    # a's explicit import of its own package is a real edge: pkg -> pkg.a -> pkg
    assert cycles(tmp_path, ("pkg",)) == ["modules: pkg -> pkg.a -> pkg"]


@pytest.mark.parametrize("text", ["import pkg.sub.m\n", "from pkg.sub import m\n", "from .sub.m import f\n"])
def test_importing_a_submodule_imports_its_packages(tmp_path, text):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": text, "pkg/sub/__init__.py": "", "pkg/sub/m.py": ""})
    assert import_graph(tmp_path, ("pkg",))["pkg.a"] == {"pkg.sub", "pkg.sub.m"}
