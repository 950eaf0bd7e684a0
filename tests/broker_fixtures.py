"""Fresh, self-removing broker destinations for tests that drive a real server: one place for the
setup that several test modules need (the servers themselves come from the conftest fixtures)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from replaysafe.failpoints import Failpoints


@contextlib.asynccontextmanager
async def sqs_queue(
    endpoint: str, prefix: str, *, visibility_timeout: int, **broker_kw: Any
) -> AsyncIterator[tuple[Any, str]]:
    """An ``SQSBroker`` on ``endpoint`` (moto: any credentials) and a new queue named
    ``prefix-<random>``; the queue is deleted and the broker closed afterwards."""
    from replaysafe.brokers.sqs import SQSBroker

    broker = SQSBroker(
        region="us-east-1", endpoint_url=endpoint, wait_time=1, aws_access_key_id="testing",
        aws_secret_access_key="testing", failpoints=Failpoints(), **broker_kw,
    )  # fmt: skip
    queue = f"{prefix}-{uuid.uuid4().hex[:10]}"
    await broker.create_queue(queue, visibility_timeout=visibility_timeout)
    try:
        yield broker, queue
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(queue)
        await broker.close()


@contextlib.asynccontextmanager
async def rabbit_source(url: str, prefix: str, groups: list[str]) -> AsyncIterator[tuple[Any, str]]:
    """A ``RabbitMQBroker`` on ``url`` and a new source ``prefix-<random>`` declared for
    ``groups``; its topology is deleted and the broker closed afterwards."""
    from replaysafe.brokers.rabbitmq import RabbitMQBroker

    source = f"{prefix}-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQBroker(url, failpoints=Failpoints())
    await broker.declare(source, groups)
    try:
        yield broker, source
    finally:
        with contextlib.suppress(Exception):
            await broker.delete(source, groups)
        await broker.close()
