"""docs/guard.md stays true: every python block compiles, its imports exist, each runs as a
module would be imported (the loops sit under ``if __name__ == "__main__":``, so nothing is
consumed), and the `replaysafe explain` sample is what the command prints for the thread-pool
example."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from replaysafe import Guard
from replaysafe.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "guard.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def test_the_doc_has_the_four_consumers_and_is_linked() -> None:
    code = "\n".join(BLOCKS)
    for needle in ("import aio_pika", "from confluent_kafka import", "import boto3",
                   "@guard.once", "ThreadPoolExecutor", "run_batch_sync"):  # fmt: skip
        assert needle in code, needle
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "docs/guard.md" in readme


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_compiles_and_its_imports_exist(block: str) -> None:
    tree = ast.parse(block)
    compile(tree, str(DOC), "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_imports_as_a_module_without_consuming(
    block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as ``replaysafe explain`` would import it: guards are built (ledgers connect lazily),
    no loop runs. Blocks that are fragments (they use a ``guard`` of an earlier block) get one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # boto3.client("sqs") at import
    namespace: dict[str, object] = {"__name__": "consumer"}
    if "guard = Guard(" not in block:
        from replaysafe import Guarantee
        from replaysafe.ledger import MemoryLedger

        namespace["guard"] = Guard(MemoryLedger(), name="g", guarantee=Guarantee.AT_LEAST_ONCE)
    exec(compile(block, str(DOC), "exec"), namespace)
    guard = namespace.get("guard")
    assert isinstance(guard, Guard)


def test_the_explain_sample_is_what_the_command_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [pool] = [b for b in BLOCKS if "@guard.once" in b]
    (tmp_path / "consumer.py").write_text(pool)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = CliRunner().invoke(main, ["explain", "consumer:guard"])
    assert out.exit_code == 0, out.output
    sample = TEXT.split("$ COLUMNS=100 replaysafe explain consumer:guard\n", 1)[1]
    sample = sample.split("```", 1)[0]
    # rich wraps at the terminal's width: compare the words
    assert sample.split() == out.output.split()
