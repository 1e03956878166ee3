"""Import directions (docs: README "Where things live").

Reads every module's imports with `ast` (imports inside functions included,
since a lazy import still runs) and follows the project's own modules
transitively (importing `a.b.c` also runs `a` and `a.b`), so an arrow the
wrong way fails here even when it goes through a third module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imagesearch", "embedder_service", "ranker_service", "trainer", "clients", "testkit", "bench", "tests")
# What `pip install` ships; testkit, bench and tests are not installed.
PRODUCT = ("imagesearch", "embedder_service", "ranker_service", "trainer", "clients")

# (what, modules it applies to, prefixes of what they must never import)
RULES = [
    ("the core imports no part built on it", ("imagesearch",),
     ("embedder_service", "ranker_service", "trainer", "clients", "testkit", "bench", "tests")),
    ("the product never imports the test kit, the benchmarks or the tests", PRODUCT, ("testkit", "bench", "tests")),
    ("the embedder never imports the trainer", ("embedder_service",), ("trainer",)),
    ("the trainer never imports gRPC", ("trainer",), ("grpc", "grpc_*")),
    ("the model never imports gRPC", ("imagesearch.model",), ("grpc", "grpc_*")),
    ("clients never import torch or a service",
     ("clients",), ("torch", "torchvision", "timm", "embedder_service", "ranker_service", "trainer")),
    ("the ranker never imports torch or the model", ("ranker_service",), ("torch", "torchvision", "timm",
                                                                         "imagesearch.model")),
    ("bench never imports tests", ("bench",), ("tests",)),
    ("tests never import bench", ("tests",), ("bench",)),
    ("the shared test helpers are torch-free", ("testkit",), ("torch", "torchvision", "timm")),
    ("the defaults are torch-free", ("imagesearch.defaults",), ("torch", "torchvision", "timm")),
    # the ranker by layer (docs/ranker.md#where-things-live)
    ("the ranker's in-memory indexes know no storage, re-ranking, Milvus or gRPC", ("ranker_service.memory",),
     ("ranker_service.sqlite", "ranker_service.rerank", "ranker_service.milvus", "ranker_service.servicer",
      "sqlite3", "sqlite_utils", "pymilvus", "grpc", "grpc_*")),
    ("the Milvus backend never imports the SQLite backend or the in-memory indexes", ("ranker_service.milvus",),
     ("ranker_service.sqlite", "ranker_service.memory", "sqlite3", "sqlite_utils", "faiss")),
    ("the re-ranking maths knows no index and no storage", ("ranker_service.rerank.maths",),
     ("ranker_service.memory", "ranker_service.sqlite", "ranker_service.milvus")),
    ("the ranker's value types, checks, alias rules and backend protocol import no other layer of it",
     ("ranker_service.types", "ranker_service.validation", "ranker_service.aliases", "ranker_service.backend",
      "ranker_service.topk"),
     ("ranker_service.memory", "ranker_service.sqlite", "ranker_service.rerank", "ranker_service.milvus",
      "ranker_service.servicer", "ranker_service.metrics", "ranker_service.__main__", "grpc", "faiss")),
]
RANKER_MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


@functools.lru_cache(maxsize=None)
def direct_imports(module: str) -> frozenset[str]:
    """Every dotted name `module` imports, anywhere in its body."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            names.add(base)
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                if f"{base}.{alias.name}" in MODULES:
                    names.add(f"{base}.{alias.name}")
    return frozenset(n for n in names if n)


def with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(module: str) -> dict[str, list[str]]:
    """Every name `module` imports directly or through project modules,
    each with the chain of modules that leads to it."""
    chains: dict[str, list[str]] = {}
    todo = [(module, [module])]
    seen = {module}
    while todo:
        current, chain = todo.pop()
        for name in direct_imports(current):
            for part in with_parents(name):
                chains.setdefault(part, chain + [part])
                if part in MODULES and part not in seen:
                    seen.add(part)
                    todo.append((part, chain + [part]))
    return chains


def matches(name: str, prefix: str) -> bool:
    if prefix.endswith("*"):
        return name.split(".")[0].startswith(prefix[:-1])
    return name == prefix or name.startswith(prefix + ".")


def applies(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(matches(module, p) for p in prefixes)


@pytest.mark.parametrize("what,sources,forbidden", RULES, ids=[r[0] for r in RULES])
def test_imports_point_one_way(what, sources, forbidden):
    checked = [m for m in MODULES if applies(m, sources)]
    assert checked, f"no module matches {sources}: is the rule stale?"
    wrong = []
    for module in checked:
        for name, chain in sorted(import_closure(module).items()):
            if applies(name, forbidden):
                wrong.append(" -> ".join(chain))
    assert not wrong, f"{what}; these import chains break it:\n" + "\n".join(wrong)


def test_the_scanner_sees_imports_inside_functions_and_through_other_modules():
    # The embedder imports torch only inside a function, after binding its port.
    assert "torch" in direct_imports("embedder_service.__main__")
    # The ranker's command reaches grpc only through the shared serving layer.
    closure = import_closure("ranker_service.__main__")
    assert "grpc" not in direct_imports("ranker_service.__main__")
    assert closure["grpc"][0] == "ranker_service.__main__" and len(closure["grpc"]) > 2
    # `from imagesearch import serving` counts as importing the module imagesearch.serving.
    assert "imagesearch.serving" in direct_imports("ranker_service.__main__")


def test_only_tests_and_benchmarks_import_the_test_helpers():
    users = sorted(m for m in MODULES if "testkit" in direct_imports(m))
    assert users and all(applies(m, ("tests", "bench")) for m in users), users


def test_a_rule_catches_a_forbidden_import():
    # The embedder imports the model (and so torch): the ranker's rule would flag it.
    closure = import_closure("embedder_service.embedder")
    assert any(applies(name, ("torch", "imagesearch.model")) for name in closure)


# ---------------------------------------------------------------- import circles

def import_graph(modules) -> dict[str, set[str]]:
    """module -> the project modules its imports run (module-level and
    function-level alike; `a.b.c` runs `a` and `a.b` too), among `modules`.
    A module's own parent packages are left out: they are initialised
    before it runs, so a package `__init__` that re-exports its modules
    makes no circle with them."""
    graph = {}
    for module in modules:
        edges = set()
        for name in direct_imports(module):
            for part in with_parents(name):
                if part in modules and part != module and not module.startswith(part + "."):
                    edges.add(part)
        graph[module] = edges
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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
                        circles.append(sorted(component))
    return circles


def circle_path(graph: dict[str, set[str]], circle: list[str]) -> str:
    """One loop through the circle's modules, for the message."""
    members = set(circle)
    path = [circle[0]]
    while True:
        nxt = min(m for m in graph[path[-1]] if m in members)
        if nxt in path:
            return " -> ".join(path[path.index(nxt):] + [nxt])
        path.append(nxt)


def test_no_import_circles_in_the_product():
    graph = import_graph({m for m in MODULES if applies(m, PRODUCT)})
    circles = import_circles(graph)
    assert not circles, "import circles (function-level imports count):\n" + "\n".join(
        circle_path(graph, c) for c in circles)


def test_the_circle_finder_sees_a_circle_and_ignores_parent_packages():
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "q": set()}
    assert import_circles(graph) == [["p.a", "p.b", "p.c"]]
    assert circle_path(graph, ["p.a", "p.b", "p.c"]) == "p.a -> p.b -> p.c -> p.a"
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # clients/__init__ re-exports clients.ranker, which imports clients.types: no circle
    graph = import_graph({m for m in MODULES if applies(m, ("clients",))})
    assert "clients" not in graph["clients.types"] and "clients.ranker" in graph["clients"]


# ---------------------------------------------------------------- the ranker's layers

def test_ranker_modules_stay_small():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items() if applies(m, ("ranker_service",))}
    big = {m: n for m, n in sizes.items() if n > RANKER_MAX_LINES}
    assert not big, f"ranker_service modules over {RANKER_MAX_LINES} lines (split by job): {big}"


def test_no_product_module_imports_a_private_name_of_another():
    wrong = []
    for module, path in MODULES.items():
        if not applies(module, PRODUCT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or applies(node.module or "", PACKAGES)):
                wrong += [f"{module}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, "private names belong to their module:\n" + "\n".join(wrong)


def test_ranker_collections_are_typed():
    """Every parameter that takes an in-memory collection says which protocol it follows."""
    untyped = []
    for module, path in MODULES.items():
        if applies(module, ("ranker_service",)):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    untyped += [f"{module}.{node.name}({a.arg})" for a in node.args.args + node.args.kwonlyargs
                                if a.arg in ("coll", "collection_index") and a.annotation is None]
    assert not untyped, untyped
