"""The dependency rule of docs/ARCHITECTURE.md, enforced by reading the imports (ast).

    oci  <-  {layers, registry, store}  <-  {overlay, lazy, session, ...}
         <-  {fs, browse, build, ...}  <-  api  <-  cli

A module may import its own rank or lower ones, never a higher one, and no import cycle may
exist among the modules of `imagefs/`. What counts as an import:

- every `import` / `from ... import`, at module level *and inside functions*: a lazy import
  (done for start-up time) is still a dependency, and a cycle through one breaks the day it
  is moved to the top;
- except those under `if TYPE_CHECKING:`, which never run (annotations only);
- importing `a.b.c` also runs the packages `a.b` and `a` (their `__init__`), so it counts
  as importing them too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "imagefs"

# Ranks, lowest first. A module's rank is the one of its longest matching prefix.
RANKS: list[tuple[str, ...]] = [
    # PURE values and parsers that know nothing of imagefs's machinery.
    (
        "imagefs.errors",
        "imagefs.oci",
        "imagefs.gotemplate",
        "imagefs.formats",
        "imagefs.profiles",
        "imagefs.report",
        "imagefs.config",
    ),
    ("imagefs.layers",),  # PURE: layer formats (tar, TOC, seek points, eStargz, zstd:chunked)
    ("imagefs.registry", "imagefs.store"),  # the only HTTP code; the only disk state
    # What a mount is made of: the pure overlay, the lazy layer set and what wires it.
    (
        "imagefs.overlay",
        "imagefs.lazy",
        "imagefs.session",
        "imagefs.pulling",
        "imagefs.artifacts",
        "imagefs.published",
    ),
    # The front ends below the verbs.
    (
        "imagefs.fs",
        "imagefs.browse",
        "imagefs.build",
        "imagefs.check",
        "imagefs.profiling",
        "imagefs.settings",
    ),
    ("imagefs.api",),
    ("imagefs.cli", "imagefs.__main__"),
    ("imagefs.testing",),  # shared by tests and tools; nothing in the product imports it
]

# Pure cores: what each may reach at all, transitively.
PURE_REACH = {
    "imagefs.oci": ("imagefs.oci", "imagefs.errors"),
    "imagefs.layers": ("imagefs.layers", "imagefs.oci", "imagefs.errors"),
    "imagefs.overlay": ("imagefs.overlay", "imagefs.layers", "imagefs.oci", "imagefs.errors"),
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_names(package: Path) -> dict[str, Path]:
    top = package.name
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = [top, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        if not is_package:
            base.pop()
        base = base[: len(base) - (node.level - 1)]
        where = ".".join([*base, *([node.module] if node.module else [])])
    else:
        where = node.module or ""
    # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
    return [where, *(f"{where}.{alias.name}" for alias in node.names)]


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (see the module docstring)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(name, path.name == "__init__.py", node):
                parts = target.split(".")
                # The module itself and the packages that contain it all run.
                deps.update(
                    ".".join(parts[:n])
                    for n in range(1, len(parts) + 1)
                    if ".".join(parts[:n]) in modules
                )
        deps.discard(name)
        graph[name] = {d for d in deps if not _within(name, d)}  # own packages: already run
    return graph


def rank_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(RANKS):
        for prefix in prefixes:
            if _within(module, prefix) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} (rank {rank_of(a)}) imports {b} (rank {rank_of(b)})"
        for a, deps in sorted(graph.items())
        for b in sorted(deps)
        if rank_of(b) > rank_of(a)
    ]


def unranked(graph: dict[str, set[str]]) -> list[str]:
    return [m for m in sorted(graph) if m != PACKAGE.name and rank_of(m) < 0]


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def impure_reach(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for core, allowed in PURE_REACH.items():
        for module in sorted(m for m in graph if _within(m, core)):
            for dep in sorted(reach(graph, module)):
                if dep != PACKAGE.name and not any(_within(dep, a) for a in allowed):
                    out.append(f"{module} reaches {dep}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one
    cycle through them, for the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_one_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    raise AssertionError("a strongly connected component without a cycle")


def _show(lines: Iterable[str]) -> str:
    return "\n  " + "\n  ".join(lines)


# -- the rule, on imagefs itself ----------------------------------------------------------------


GRAPH = import_graph(PACKAGE)


def test_every_module_has_a_rank() -> None:
    assert not unranked(GRAPH), "add these to RANKS:" + _show(unranked(GRAPH))


def test_no_module_imports_a_higher_rank() -> None:
    found = upward_imports(GRAPH)
    assert not found, "imports against the dependency direction:" + _show(found)


def test_pure_cores_reach_nothing_above_them() -> None:
    found = impure_reach(GRAPH)
    assert not found, "oci/layers/overlay must stay pure:" + _show(found)


def test_no_import_cycle() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles:" + _show(" -> ".join(c) for c in found)


# -- the checker itself: each rule fires on a small tree that breaks it --------------------------


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    package = tmp / "imagefs"
    for rel, text in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


BASE = {
    "__init__.py": "",
    "errors.py": "",
    "oci/__init__.py": "",
    "oci/digest.py": "from imagefs.errors import x\n",
    "layers/__init__.py": "",
    "store/__init__.py": "",
    "api.py": "",
}


def test_checker_sees_a_lazy_upward_import_and_the_cycle_it_makes(tmp_path: Path) -> None:
    package = _tree(
        tmp_path,
        {
            **BASE,
            "api.py": "from imagefs.store import lookup\n",
            "store/lookup.py": "def f():\n    from imagefs import api\n    return api\n",
        },
    )
    graph = import_graph(package)
    assert upward_imports(graph) == ["imagefs.store.lookup (rank 2) imports imagefs.api (rank 5)"]
    assert cycles(graph) == [["imagefs.api", "imagefs.store.lookup", "imagefs.api"]]


def test_checker_ignores_type_checking_imports(tmp_path: Path) -> None:
    package = _tree(
        tmp_path,
        {
            **BASE,
            "oci/digest.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from imagefs.store import Store\n"
            ),
        },
    )
    graph = import_graph(package)
    assert graph["imagefs.oci.digest"] == set()
    assert not impure_reach(graph)


def test_checker_sees_a_pure_core_reach_through_a_peer(tmp_path: Path) -> None:
    # layers -> store is also upward; the reach rule names every pure module that gets there.
    package = _tree(
        tmp_path,
        {
            **BASE,
            "layers/toc.py": "from . import index\n",
            "layers/index.py": "from ..store import fsutil\n",
            "store/fsutil.py": "",
        },
    )
    graph = import_graph(package)
    assert impure_reach(graph) == [
        "imagefs.layers.index reaches imagefs.store",
        "imagefs.layers.index reaches imagefs.store.fsutil",
        "imagefs.layers.toc reaches imagefs.store",
        "imagefs.layers.toc reaches imagefs.store.fsutil",
    ]


@pytest.mark.parametrize("module", ["imagefs.oci.image", "imagefs.store.lookup"])
def test_graph_reads_this_tree(module: str) -> None:
    assert module in GRAPH  # the graph really is of imagefs/, not an empty walk
