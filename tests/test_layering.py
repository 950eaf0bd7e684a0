"""The package's layering, held on its import graph (issue 15, "Done when").

The graph is built statically: every module under ``src/replaysafe`` is parsed with :mod:`ast` and
each ``import`` / ``from … import`` of a ``replaysafe`` module, absolute or relative, becomes an
edge ``importer -> imported`` with its file and line. ``from pkg import name`` points at
``pkg.name`` when that is a module, else at ``pkg``; an edge points at the named module only, not
at the parent packages that Python also initialises on the way (counting those would make every
module that imports ``replaysafe.errors`` part of a cycle through ``replaysafe/__init__.py``).

Each edge is one of three kinds:

- ``module``: runs when the importer is imported (top level, class bodies, ``try`` blocks);
- ``lazy``: inside a function, runs when the function is called;
- ``type_checking``: under ``if TYPE_CHECKING:``, never runs (the ``else`` branch does).

The layering rules (a)-(c) hold over ALL edges: a lazy import is still a dependency (it only moves
the moment it fails), and a ``TYPE_CHECKING`` import is a dependency of the code's types, which is
the coupling the rules forbid. The cycle rule (d) looks at ``module`` edges only, because only those
run while a module is being imported: a lazy or type-only import cannot leave a module half
initialised.

The rules:

(a) ``replaysafe.runtime.*`` imports no concrete backend: no module of ``replaysafe.brokers``,
    ``replaysafe.ledger`` or ``replaysafe.outbox`` other than the backend-neutral ones listed in
    ``NEUTRAL``, and not the packages themselves when their ``__init__`` loads a concrete backend
    (computed). Any other child of those packages, module or subpackage (``brokers/kafka/`` once
    the adapters become packages), is a concrete backend without editing this file.
(b) broker adapters, ledgers and outbox stores (every module under ``replaysafe.brokers``,
    ``replaysafe.ledger``, ``replaysafe.outbox``, ``replaysafe.stores``) import nothing from
    ``replaysafe.runtime``, ``replaysafe.app``, ``replaysafe.guard`` or ``replaysafe.cli``.
(c) the library (every module but the tools in ``TOOLS``) imports nothing from the test rig
    ``replaysafe.testing``.
(d) no import cycle among ``module`` edges.

An edge that breaks a rule today and cannot be fixed in place goes into ``ALLOWED`` with its reason;
an allowed edge that no longer exists fails the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import replaysafe

SRC = Path(replaysafe.__file__).parent
ROOT = "replaysafe"

Kind = Literal["module", "lazy", "type_checking"]

#: the layers whose children are backends, and the children of each that are backend-neutral
#: (protocols, state machines, helpers over the protocols' types): every other child, module or
#: subpackage, present or added later, is a concrete backend
NEUTRAL: dict[str, frozenset[str]] = {
    "brokers": frozenset({"base"}),
    # durability: the durability probe and its statement, over the Ledger protocol;
    # _fast: cheaper constructors for base's result types (any backend's batch path);
    # _types, _rules, _text: base's value types, pure rules and text rules (base re-exports them)
    "ledger": frozenset({"base", "durability", "_fast", "_types", "_rules", "_text"}),
    # relay: publishes what any OutboxStore holds through any Broker
    "outbox": frozenset({"base", "relay"}),
    # the engines (stores/postgres, stores/sqlite, …): every one is concrete
    "stores": frozenset(),
}
#: what broker adapters, ledgers and outbox stores must not import (rule b)
ABOVE_BACKENDS = ("runtime", "app", "guard", "cli")
#: the tools around the library, which may use the test rig (rule c); ``examples`` holds the
#: demo's apps (``replaysafe explain replaysafe.examples.payments:app``), built by the demo with
#: the rig's EffectProbe
TOOLS = ("cli", "chaos", "demo", "examples", "simulate", "testing")
#: the test rig (rule c)
TEST_RIG = "testing"

#: edges that break a rule today, by rule, with the reason each is tolerated (see the docstring)
ALLOWED: dict[str, dict[tuple[str, str], str]] = {
    "a": {},
    "b": {},
    "c": {},
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    path: str
    line: int
    kind: Kind

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.path}:{self.line}, {self.kind})"


@dataclass(frozen=True)
class Graph:
    root: str
    #: module name -> its file
    modules: dict[str, Path]
    edges: tuple[Edge, ...]


def within(module: str, package: str) -> bool:
    """Whether ``module`` is ``package`` or lies under it."""
    return module == package or module.startswith(package + ".")


def discover(src: Path, root: str) -> dict[str, Path]:
    """Every module of the package at ``src`` (named ``root``), by dotted name."""
    modules = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([root, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, Kind]]:
    """Every import statement in ``tree`` with the kind of edge it makes."""

    def walk(node: ast.AST, kind: Kind) -> Iterator[tuple[ast.Import | ast.ImportFrom, Kind]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, kind
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from walk(child, "type_checking")
            for child in node.orelse:
                yield from walk(child, kind)
            return
        inner: Kind = kind
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and kind != (
            "type_checking"
        ):
            inner = "lazy"
        for child in ast.iter_child_nodes(node):
            yield from walk(child, inner)

    yield from walk(tree, "module")


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``None``: not ours)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def build_graph(src: Path, root: str) -> Graph:
    """The import graph of the package at ``src`` (see the module docstring)."""
    modules = discover(src, root)
    edges: list[Edge] = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        rel = path.relative_to(src.parent).as_posix()
        for node, kind in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, modules) for a in node.names]
            else:
                if node.level:
                    package = importer if is_package else importer.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{node.module}" if node.module else package
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else _known(base, modules))
            for target in dict.fromkeys(targets):
                if target is not None:
                    edges.append(Edge(importer, target, rel, node.lineno, kind))
    return Graph(root, modules, tuple(edges))


def concrete_backends(graph: Graph) -> set[str]:
    """The modules of ``brokers``, ``ledger`` and ``outbox`` that are concrete backends: every
    child (module or subpackage, with all it holds) not in ``NEUTRAL``, plus the layer packages
    whose ``__init__`` imports such a module at import time (importing them loads a backend)."""
    concrete = set()
    for layer, neutral in NEUTRAL.items():
        package = f"{graph.root}.{layer}"
        for m in graph.modules:
            if m != package and within(m, package):
                child = m[len(package) + 1 :].split(".")[0]
                if child not in neutral:
                    concrete.add(m)
    for layer in NEUTRAL:
        package = f"{graph.root}.{layer}"
        if any(
            e.importer == package and e.kind == "module" and e.imported in concrete
            for e in graph.edges
        ):
            concrete.add(package)
    return concrete


def runtime_imports_concrete_backend(graph: Graph) -> list[Edge]:
    """Rule (a)."""
    concrete = concrete_backends(graph)
    runtime = f"{graph.root}.runtime"
    return [e for e in graph.edges if within(e.importer, runtime) and e.imported in concrete]


def runtime_loads_concrete_backend(graph: Graph) -> list[list[Edge]]:
    """Rule (a) followed through other modules: per runtime module, the chain of ``module`` edges
    by which importing it would load a concrete backend (``[]``: none does)."""
    concrete = concrete_backends(graph)
    runtime = f"{graph.root}.runtime"
    succ: dict[str, list[Edge]] = {}
    for e in graph.edges:
        if e.kind == "module":
            succ.setdefault(e.importer, []).append(e)
    chains = []
    for start in sorted(m for m in graph.modules if within(m, runtime)):
        via: dict[str, Edge | None] = {start: None}
        queue = [start]
        while queue:
            m = queue.pop(0)
            if m in concrete:
                chain = []
                while (edge := via[m]) is not None:
                    chain.append(edge)
                    m = edge.importer
                chains.append(chain[::-1])
                break
            for e in succ.get(m, []):
                if e.imported not in via:
                    via[e.imported] = e
                    queue.append(e.imported)
    return chains


def backend_imports_above(graph: Graph) -> list[Edge]:
    """Rule (b)."""
    backends = [f"{graph.root}.{layer}" for layer in NEUTRAL]
    above = [f"{graph.root}.{name}" for name in ABOVE_BACKENDS]
    return [
        e
        for e in graph.edges
        if any(within(e.importer, b) for b in backends)
        and any(within(e.imported, a) for a in above)
    ]


def library_imports_test_rig(graph: Graph) -> list[Edge]:
    """Rule (c)."""
    tools = [f"{graph.root}.{name}" for name in TOOLS]
    rig = f"{graph.root}.{TEST_RIG}"
    return [
        e
        for e in graph.edges
        if not any(within(e.importer, t) for t in tools) and within(e.imported, rig)
    ]


def import_cycles(graph: Graph) -> list[list[str]]:
    """Rule (d): the strongly connected components of the ``module`` edges that hold a cycle,
    each as its sorted module names (Tarjan's algorithm, iterative)."""
    succ: dict[str, set[str]] = {m: set() for m in graph.modules}
    for e in graph.edges:
        if e.kind == "module":
            succ[e.importer].add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1 or node in succ[node]:
                    cycles.append(sorted(component))
    return cycles


def _failures(rule: str, text: str, found: list[Edge]) -> list[str]:
    allowed = ALLOWED[rule]
    out = [f"rule ({rule}) {text}: {e}" for e in found if (e.importer, e.imported) not in allowed]
    present = {(e.importer, e.imported) for e in found}
    out += [
        f"rule ({rule}): the allowed edge {a} -> {b} is gone; remove it from ALLOWED[{rule!r}]"
        for a, b in allowed
        if (a, b) not in present
    ]
    return out


# the real package


GRAPH = build_graph(SRC, ROOT)


def test_the_graph_sees_the_package() -> None:
    """The rules below cannot pass on an empty or misread graph."""
    assert len(GRAPH.modules) > 60
    assert {"replaysafe.cli", "replaysafe.cli.run", "replaysafe.runtime.worker"} <= set(
        GRAPH.modules
    )
    edges = {(e.importer, e.imported, e.kind) for e in GRAPH.edges}
    assert ("replaysafe.runtime.worker", "replaysafe.ledger.base", "module") in edges
    assert ("replaysafe.cli", "replaysafe.cli.run", "module") in edges
    # the registry names each backend by a string (imported when opened): each names a module
    # the graph holds, so a backend reached that way is still checked by the rules below
    from replaysafe._registry import BACKENDS

    for backend in BACKENDS:
        assert backend.opener.partition(":")[0] in GRAPH.modules, backend
    concrete = concrete_backends(GRAPH)
    for backend in ("brokers.memory", "brokers.rabbitmq", "brokers.sqs", "brokers.kafka",
                    "ledger.memory", "ledger.sqlite", "ledger.postgres", "ledger.redis",
                    "outbox.sqlite", "outbox.postgres"):  # fmt: skip
        assert f"replaysafe.{backend}" in concrete
    assert not concrete & {"replaysafe.brokers.base", "replaysafe.ledger.base"}


def test_runtime_imports_no_concrete_backend() -> None:
    assert _failures("a", "the runtime imports a concrete backend; import the protocol from "
                     "the layer's base module, or take the backend as an argument",
                     runtime_imports_concrete_backend(GRAPH)) == []  # fmt: skip
    # nor through another module, at import time
    assert [
        f"rule (a) importing the runtime loads a concrete backend: {' ; '.join(map(str, chain))}"
        for chain in runtime_loads_concrete_backend(GRAPH)
    ] == []


def test_brokers_ledgers_and_outboxes_import_nothing_above_them() -> None:
    assert _failures("b", "a backend imports the runtime, app, guard or cli above it; move what "
                     "it needs down (into the layer's base module or a neutral module)",
                     backend_imports_above(GRAPH)) == []  # fmt: skip


def test_the_library_imports_nothing_from_the_test_rig() -> None:
    assert _failures("c", "the library imports the test rig replaysafe.testing; move what it "
                     "needs into the library",
                     library_imports_test_rig(GRAPH)) == []  # fmt: skip


def test_no_import_cycle() -> None:
    found = []
    for cycle in import_cycles(GRAPH):
        inside = [
            str(e)
            for e in GRAPH.edges
            if e.kind == "module" and e.importer in cycle and e.imported in cycle
        ]
        found.append(f"rule (d) import cycle among {cycle}: {'; '.join(inside)}")
    assert found == []


# the checker itself, on a synthetic package that breaks every rule once


def _tree(root: Path, files: dict[str, str]) -> Path:
    src = root / "replaysafe"
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_the_checker_catches_each_violation(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        # (d): a <-> b at import time; c imports a only in a function: no cycle through c
        "a.py": "from replaysafe import b\n",
        "b.py": "import replaysafe.a\n",
        "c.py": "def f():\n    from . import a\n",
        # (c): the library under TYPE_CHECKING; the tools may
        "app.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                  "    from replaysafe.testing.rig import Fake\nelse:\n    import replaysafe.c\n",
        "chaos/__init__.py": "from replaysafe.testing import rig\n",
        "testing/__init__.py": "",
        "testing/rig.py": "from replaysafe import app\n",
        # (a): a backend added as a subpackage, reached by a relative import
        "runtime/__init__.py": "",
        "runtime/worker.py": "from ..brokers.kafka.consumer import Consumer\n"
                             "from ..brokers.base import Broker\n"
                             "from replaysafe.ledger import base, fancy\n",
        "brokers/__init__.py": "",
        "brokers/base.py": "",
        "brokers/kafka/__init__.py": "from .consumer import Consumer\n",
        # (b): a lazy import of the runtime from inside the adapter
        "brokers/kafka/consumer.py": "class Consumer:\n    def run(self):\n"
                                     "        from ...runtime import worker\n",
        "ledger/__init__.py": "",
        "ledger/base.py": "",
        "ledger/fancy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    from replaysafe.guard import Guard\n",
        "guard.py": "",
        "outbox/__init__.py": "from replaysafe.outbox.shelf import Shelf\n",
        "outbox/shelf.py": "",
    })  # fmt: skip
    graph = build_graph(src, ROOT)

    def pairs(edges: list[Edge]) -> set[tuple[str, str, Kind]]:
        return {(e.importer, e.imported, e.kind) for e in edges}

    assert concrete_backends(graph) == {
        "replaysafe.brokers.kafka", "replaysafe.brokers.kafka.consumer",
        "replaysafe.ledger.fancy", "replaysafe.outbox.shelf", "replaysafe.outbox",
    }  # fmt: skip
    assert pairs(runtime_imports_concrete_backend(graph)) == {
        ("replaysafe.runtime.worker", "replaysafe.brokers.kafka.consumer", "module"),
        ("replaysafe.runtime.worker", "replaysafe.ledger.fancy", "module"),
    }
    [chain] = runtime_loads_concrete_backend(graph)
    assert [e.imported for e in chain] == ["replaysafe.brokers.kafka.consumer"]
    assert pairs(backend_imports_above(graph)) == {
        ("replaysafe.brokers.kafka.consumer", "replaysafe.runtime.worker", "lazy"),
        ("replaysafe.ledger.fancy", "replaysafe.guard", "type_checking"),
    }
    assert pairs(library_imports_test_rig(graph)) == {
        ("replaysafe.app", "replaysafe.testing.rig", "type_checking"),
    }
    # app -> testing.rig -> app is a cycle only through a TYPE_CHECKING edge: not reported
    assert import_cycles(graph) == [["replaysafe.a", "replaysafe.b"]]
    [edge] = [e for e in graph.edges if e.importer == "replaysafe.b"]
    assert str(edge) == "replaysafe.b -> replaysafe.a (replaysafe/b.py:1, module)"
