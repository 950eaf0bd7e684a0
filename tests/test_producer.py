"""The producer: one envelope or many, stamped once, retried with the same envelope."""

from __future__ import annotations

from typing import Any

import pytest

from replaysafe import ConfigurationError, Envelope, Guarantee, Producer
from replaysafe.brokers import MemoryBroker
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.testing import FakeClock


def _producer() -> tuple[Producer, MemoryBroker]:
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    broker.declare("orders", mode=RedeliveryKind.NACK)
    return Producer(broker, Guarantee.EFFECTIVELY_ONCE, clock=clock), broker


async def test_publish_takes_a_single_envelope() -> None:
    # issue 13 item 9a: publish(dest, envelope) raised "'Envelope' object is not iterable"
    producer, broker = _producer()
    result = await producer.publish("orders", Envelope.of("charge:order-1", {"order": 1}))
    assert result.confirmed and result.attempts == 1
    assert broker.published("orders") == ["charge:order-1"]
    [stored] = broker.messages("orders")
    assert stored.headers["rs-published-at"]  # stamped like a batch member


async def test_publish_takes_a_sequence_of_envelopes() -> None:
    producer, broker = _producer()
    envs = (Envelope.of("charge:order-1", {"order": 1}), Envelope.of("charge:order-2", {"n": 2}))
    assert (await producer.publish("orders", envs)).confirmed
    assert broker.published("orders") == ["charge:order-1", "charge:order-2"]


@pytest.mark.parametrize("bad", [{"order": 1}, [{"order": 1}], "charge:order-1"])
async def test_publish_refuses_what_is_not_an_envelope(bad: Any) -> None:
    producer, broker = _producer()
    with pytest.raises(ConfigurationError, match=r"Envelope\.of"):
        await producer.publish("orders", bad)
    assert broker.published("orders") == []
