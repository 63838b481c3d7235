"""The architecture, enforced: the import graph of api, worker, cli, core, robustify and migrations,
read from the source with `ast` (imports at module level and inside functions alike).

- No import cycle between modules (a package's __init__ counts as a module).
- Floors, lowest first: core.errors, core.limits, core.states (and the SDK, robustify); then
  core.engine; core.service; core.storage; migrations; worker and api; cli. No module imports
  one on a higher floor.
- core.engine imports nothing of core.service, core.storage, api, worker or cli; core imports
  no api, worker or cli; robustify imports none of core, api, worker, cli and no torch, except
  robustify.engine: the engine's documented import path, on the engine's floor, which re-exports
  core.engine.api and which nothing of the SDK imports (so `import robustify` loads no torch).
- The API process imports no torch: importing api.app loads none.
"""
from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "worker", "cli", "core", "robustify", "migrations")

# (prefix, floor): a module's floor is that of the longest prefix it starts with.
FLOORS: tuple[tuple[str, int], ...] = (
    ("core.errors", 0), ("core.limits", 0), ("core.states", 0), ("robustify", 0),
    ("core", 0),              # the package's own __init__ (a docstring)
    ("core.engine", 1), ("robustify.engine", 1),
    ("core.service", 2),
    ("core.storage", 3),
    ("migrations", 4),
    ("worker", 5), ("api", 5),
    ("cli", 6),
)


# ------------------------------------------------------------------------------ the graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" not in path.parts and "versions" not in path.parts:
                found[_module_name(path)] = path
    return found


def _is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module name of `from <...> import`, relative imports included."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(importer: str, tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(module, line) of every import of our packages in `tree`, at any depth."""
    known = modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(importer, node)
            # `from pkg import sub` imports the module pkg.sub when there is one
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:   # `import a.b.c` of a name that is not a module: its package
                name = name.rpartition(".")[0]
            if name:
                yield name, node.lineno


@cache
def graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line}. Importing a.b.c also runs the __init__ of a and a.b,
    except those the importer's own package chain has already run."""
    edges: dict[str, dict[str, int]] = {}
    for module, path in modules().items():
        out: dict[str, int] = {}
        running = set(_ancestors(module)) | {module}
        for target, line in _imported(module, ast.parse(path.read_text(), str(path))):
            for name in [*_ancestors(target), target]:
                if name not in running and name in modules():
                    out.setdefault(name, line)
        edges[module] = out
    return edges


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                components.append(_one_cycle(sorted(component), edges))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _one_cycle(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest loop through the component's first module, as a path a -> ... -> a."""
    inside = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    return paths[v] + [start]
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def _show(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {edges[a][b]})" for a, b in itertools.pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


def floor_of(module: str) -> int:
    best = max((p for p, _ in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return dict(FLOORS)[best]


def _violations(allowed: Callable[[str, str], bool]) -> list[str]:
    edges = graph()
    return [f"{a}:{line} imports {b}" for a, out in sorted(edges.items()) for b, line in sorted(out.items())
            if not allowed(a, b)]


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# ------------------------------------------------------------------------------ the rules
def test_there_is_no_import_cycle() -> None:
    edges = graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_show(c, edges) for c in cycles)


def test_no_module_imports_a_higher_floor() -> None:
    bad = _violations(lambda a, b: floor_of(b) <= floor_of(a))
    assert not bad, "imports from a lower floor to a higher one:\n" + "\n".join(
        f"{v}  (floors {floor_of(v.split(':')[0])} -> {floor_of(v.rsplit(' ', 1)[-1])})" for v in bad)


def test_the_engine_stands_alone() -> None:
    bad = _violations(lambda a, b: not (_under(a, "core.engine")
                                        and _under(b, "core.service", "core.storage", "api", "worker", "cli")))
    assert not bad, "core.engine imports the service:\n" + "\n".join(bad)


def test_core_imports_no_application() -> None:
    bad = _violations(lambda a, b: not (_under(a, "core") and _under(b, "api", "worker", "cli", "migrations")))
    assert not bad, "core imports an application:\n" + "\n".join(bad)


# The SDK's one module that runs the engine in the user's process (robustify/engine.py argues why).
SDK_ENGINE = "robustify.engine"


def _sdk(module: str) -> bool:
    return _under(module, "robustify") and not _under(module, SDK_ENGINE)


def test_the_sdk_imports_nothing_of_the_server_and_no_torch() -> None:
    bad = _violations(lambda a, b: not (_sdk(a) and not _under(b, "robustify")))
    torch = [f"{module}:{node.lineno}" for module, path in modules().items() if _sdk(module)
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Import | ast.ImportFrom)
             and any(n.split(".")[0] == "torch" for n in
                     ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]))]
    assert not bad and not torch, "the SDK imports the server or torch:\n" + "\n".join(bad + torch)


def test_only_the_engine_module_of_the_sdk_reaches_the_engine() -> None:
    edges = graph()
    assert set(edges[SDK_ENGINE]) <= {"core", "core.engine", "core.engine.api"}, edges[SDK_ENGINE]
    importers = sorted(a for a, out in edges.items() if SDK_ENGINE in out)
    assert importers == [], f"{SDK_ENGINE} is imported by {importers}: the SDK must load it only when a user does"


def test_importing_the_sdk_loads_no_torch() -> None:
    code = "import sys, robustify; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'core'))[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import robustify loads {out.stdout.strip()}"


def test_the_api_process_imports_no_torch() -> None:
    code = "import sys, api.app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing api.app imports torch: {out.stdout.strip()}"


# ------------------------------------------------------------------------------ the checker itself
@pytest.mark.parametrize(("edges", "expected"), [
    ({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}, [["a", "b", "c", "a"]]),
    ({"a": {"b": 1}, "b": {}, "c": {"a": 1}}, []),
    ({"a": {"b": 1}, "b": {"a": 2}, "c": {"d": 1}, "d": {"c": 1}}, [["a", "b", "a"], ["c", "d", "c"]]),
])
def test_the_cycle_finder_finds_loops(edges: dict[str, dict[str, int]], expected: list[list[str]]) -> None:
    assert sorted(_cycles(edges)) == expected


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    edges = graph()
    assert "worker.jobs" in edges["worker.tasks"]            # imported inside the task function
    assert "worker.ddp" in edges["worker.jobs"] and "worker.jobs" not in edges["worker.ddp"]
    assert floor_of("core.engine.zoo") == 1 and floor_of("core.states") == 0 and floor_of("cli.main") == 6
