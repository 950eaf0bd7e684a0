"""`replaysafe demo` on the real brokers and ledgers: the three guarantees show the same signs
everywhere — at-most-once loses, at-least-once duplicates, effectively-once does neither — and
every fault hit its window."""

from __future__ import annotations

from typing import Any

import pytest

from replaysafe.demo import run_demo


def _sqs(endpoint: str) -> str:
    # moto accepts any credentials; they travel as the URL's user info
    return "sqs+http://test:test@" + endpoint.removeprefix("http://") + "/us-east-1"


def _signs(results: list[Any]) -> None:
    amo, alo, eo = results
    for r in results:
        assert all(n > 0 for n in r.faults.values()), (
            r.faults
        )  # a fault that never hit proves nothing
    assert amo.lost > 0 and amo.duplicates == 0
    assert alo.duplicates > 0 and alo.lost == 0
    assert eo.duplicates == 0 and eo.lost == 0 and eo.effects == eo.operations


async def test_demo_on_rabbitmq(amqp_url: str) -> None:
    _signs(await run_demo(orders=60, seed=5, workers=4, broker_url=amqp_url))


async def test_demo_on_sqs(sqs_endpoint: str) -> None:
    _signs(await run_demo(orders=40, seed=5, workers=4, broker_url=_sqs(sqs_endpoint)))


async def test_demo_on_kafka(kafka_bootstrap: str) -> None:
    _signs(await run_demo(orders=40, seed=5, workers=2, broker_url=f"kafka://{kafka_bootstrap}"))


@pytest.mark.parametrize("ledger", ["postgres", "redis"])
async def test_demo_with_server_ledgers(
    ledger: str, amqp_url: str, pg_dsn: str, redis_url: str
) -> None:
    spec = pg_dsn if ledger == "postgres" else redis_url
    _signs(await run_demo(orders=60, seed=9, workers=4, broker_url=amqp_url, ledger_spec=spec))
