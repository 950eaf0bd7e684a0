"""The runnable examples in examples/ (#13 item 8): each runs as its own process against the real
local services, stops by itself, and applies each effect once; the README quotes them verbatim."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
#: every example file, and the test below that runs it
RUN_BY = {
    "embedded.py": "test_embedded",
    "rabbitmq_postgres.py": "test_rabbitmq_postgres",
    "kafka_redis.py": "test_kafka_redis",
    "plain_producer.py": "test_plain_producer",
}


def run_example(name: str, env: dict[str, str], timeout: float = 180) -> list[str]:
    """Run ``examples/<name>``; it must exit 0 by itself, without a traceback. Its stdout lines."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], env=subprocess_env(**env), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Task was destroyed" not in proc.stderr, proc.stderr
    return proc.stdout.splitlines()


def once_each(lines: list[str], prefix: str, orders: list[str]) -> None:
    """Each order's effect line appears exactly once."""
    for order in orders:
        hits = [ln for ln in lines if ln.startswith(f"{prefix} {order} ")]
        assert len(hits) == 1, (order, lines)


ORDERS = ["order-1", "order-2", "order-3"]
FIRST = "worker: 3 applied, 0 answered from the ledger (3 settled)"
RETRY = "worker: 0 applied, 1 answered from the ledger (1 settled)"


def test_embedded(tmp_path: Path) -> None:
    env = {"LEDGER_PATH": str(tmp_path / "ledger.db")}
    lines = run_example("embedded.py", env)
    once_each(lines, "payments-api: charged", ORDERS)
    assert lines[-3:] == [FIRST, RETRY, "payments-api: 3 charges for 3 orders"], lines
    # again on the same ledger file: every operation is answered, nothing is charged
    again = run_example("embedded.py", env)
    assert again == [
        "worker: 0 applied, 3 answered from the ledger (3 settled)",
        RETRY,
        "payments-api: 0 charges for 3 orders",
    ], again


async def _drop_rabbitmq(url: str, source: str, group: str) -> None:
    from replaysafe.brokers.rabbitmq import RabbitMQBroker

    broker = RabbitMQBroker(url)
    try:
        await broker.delete(source, [group])
    finally:
        await broker.close()


def test_rabbitmq_postgres(amqp_url: str, pg_dsn: str, pg_schema: str) -> None:
    env = {"RABBITMQ_URL": amqp_url, "POSTGRES_DSN": pg_dsn, "EXAMPLE_NAME": pg_schema}
    try:
        lines = run_example("rabbitmq_postgres.py", env)
    finally:
        asyncio.run(
            _drop_rabbitmq(amqp_url, f"{pg_schema}.payments", f"{pg_schema}.capture_payment")
        )
    assert lines[0].startswith(f"ledger: created ledger schema '{pg_schema}'"), lines
    assert lines[1] == (
        f"declared: exchange '{pg_schema}.payments' -> queue "
        f"'{pg_schema}.payments/{pg_schema}.capture_payment'"
    ), lines
    assert lines[2:] == [
        FIRST,
        RETRY,
        *(f"payments table: {order} has 1 row(s)" for order in ORDERS),
        "payments table: 3 rows for 3 orders",
    ], lines


def test_kafka_redis(kafka_bootstrap: str, redis_url: str) -> None:
    import redis

    name = f"rs-test-{uuid.uuid4().hex[:8]}"
    env = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url, "EXAMPLE_NAME": name}
    try:
        lines = run_example("kafka_redis.py", env)
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    assert lines[0] == (
        f"declared: topic '{name}.payments', consumer group '{name}.capture_payment'"
    ), lines
    assert lines[1:3] == [FIRST, RETRY], lines
    once_each(lines, "payments-api: charged", ORDERS)
    assert lines[-1] == "payments-api: 3 charges for 3 orders", lines


def test_plain_producer(amqp_url: str, tmp_path: Path) -> None:
    name = f"rs-test-{uuid.uuid4().hex[:8]}"
    env = {"RABBITMQ_URL": amqp_url, "EXAMPLE_NAME": name,
           "LEDGER_PATH": str(tmp_path / "ledger.db")}  # fmt: skip
    try:
        lines = run_example("plain_producer.py", env)
    finally:
        asyncio.run(_drop_rabbitmq(amqp_url, f"{name}.orders", f"{name}.ship_order"))
    once_each(lines, "warehouse: shipped", ORDERS)
    assert f"producer: published ['order-2'] to exchange '{name}.orders'" in lines, lines
    assert lines[-2:] == [RETRY, "warehouse: 3 shipments for 3 orders"], lines
    assert FIRST in lines, lines


def test_every_example_is_run() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(RUN_BY)
    for example, test in RUN_BY.items():
        assert callable(globals()[test]), test
        # the test named for an example runs that file, not another one
        assert f'run_example("{example}"' in inspect.getsource(globals()[test]), (example, test)


# ---------------------------------------------------------------------------- README quotes

#: ``<!-- example: examples/FILE.py -->`` (the whole file) or ``…FILE.py#REGION -->`` (the lines
#: between ``# --8<-- [start:REGION]`` and ``# --8<-- [end:REGION]`` in the file, dedented),
#: followed by a fenced python block that must equal it
QUOTE = re.compile(r"<!-- example: (?P<path>[\w/.]+?)(?:#(?P<region>[\w-]+))? -->\n```python\n"
                   r"(?P<code>.*?)```\n", re.S)  # fmt: skip
REGION = re.compile(r"^ *# --8<-- \[(?:start|end):[\w-]+\]\n", re.M)


def quoted(path: str, region: str | None) -> str:
    text = (ROOT / path).read_text()
    if region is not None:
        start = re.search(rf"^ *# --8<-- \[start:{region}\]\n", text, re.M)
        end = re.search(rf"^ *# --8<-- \[end:{region}\]\n", text, re.M)
        assert start and end, f"{path} has no region {region!r}"
        # a region is quoted dedented, without the blank lines around it
        text = textwrap.dedent(text[start.end() : end.start()]).strip("\n") + "\n"
    return REGION.sub("", text)  # nested region markers are not quoted


def test_readme_quotes_the_examples_verbatim() -> None:
    readme = README.read_text()
    quotes = list(QUOTE.finditer(readme))
    assert len(quotes) == readme.count("<!-- example: "), "a marker without its code block"
    for m in quotes:
        assert m["code"] == quoted(m["path"], m["region"]), (
            f"README's quote of {m['path']}#{m['region']} differs from the file: copy it again"
        )
    assert {Path(m["path"]).name for m in quotes} == set(RUN_BY), "quote every example"


@pytest.mark.parametrize("name", sorted(RUN_BY))
def test_readme_links_every_example(name: str) -> None:
    assert f"](examples/{name})" in README.read_text()
