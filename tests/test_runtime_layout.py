"""The runtime's shape (issue 14, item 1), checked on the source: settle is the one place that
acks, nacks or quarantines; no runtime module over ~500 lines; app.py imports no runtime (the
app <-> worker cycle is gone, lazy imports included); the runtime and the guard import no concrete
backend."""

from __future__ import annotations

import ast
from pathlib import Path

import replaysafe

SRC = Path(replaysafe.__file__).parent
RUNTIME = sorted((SRC / "runtime").glob("*.py"))
#: what a driver may call on a delivery or a ledger only through runtime.settle
SETTLING = {"ack", "nack", "ack_confirmed", "reject", "quarantine"}


#: ledger adapters (they forward a call, they decide nothing): runtime/sync.py's OverTwin
ADAPTERS = {"OverTwin"}


def _calls(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    skipped = {
        id(inner)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef) and cls.name in ADAPTERS
        for inner in ast.walk(cls)
    }
    return [
        (node.func.attr, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and id(node) not in skipped
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in SETTLING
    ]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level and TYPE_CHECKING included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_settle_is_the_only_place_that_acks_nacks_or_quarantines() -> None:
    found = {
        f"{p.relative_to(SRC)}:{line} .{name}()"
        for p in [*RUNTIME, SRC / "guard.py"]
        if p.name != "settle.py"
        for name, line in _calls(p)
    }
    assert found == set()
    # and settle really does (the check above would pass on an empty runtime)
    assert {name for name, _ in _calls(SRC / "runtime" / "settle.py")} == {
        "ack", "nack", "ack_confirmed", "quarantine"
    }  # fmt: skip


def test_no_runtime_module_is_over_500_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in RUNTIME}
    assert {name: n for name, n in sizes.items() if n > 500} == {}
    assert "worker.py" in sizes and "pipeline.py" in sizes  # the files looked at exist


def test_app_imports_no_runtime() -> None:
    runtime = {m for m in _imports(SRC / "app.py") if m.startswith("replaysafe.runtime")}
    assert runtime == set()


def test_runtime_and_guard_import_no_concrete_backend() -> None:
    allowed = {"replaysafe.brokers.base", "replaysafe.ledger.base"}
    concrete = {
        f"{p.name}: {m}"
        for p in [*RUNTIME, SRC / "guard.py"]
        for m in _imports(p)
        if m.startswith(("replaysafe.brokers.", "replaysafe.ledger."))
        and not any(m == a or m.startswith(a + ".") for a in allowed)
    }
    assert concrete == set()
