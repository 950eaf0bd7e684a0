"""A message whose AMQP metadata the client cannot decode (issue 13 item 13).

RabbitMQ passes properties and routing keys through as the producer wrote them. pamqp refuses a
short string that is not UTF-8 and a timestamp past year 9999 (a producer stamping microseconds
is enough), aiormq's reader dies with the connection, the robust connection reconnects, RabbitMQ
delivers the same message first again: the queue was wedged, nothing behind it delivered, nothing
logged as a bad message. Now the frame is decoded tolerantly, the delivery is marked and the
runtime quarantines it as ``malformed_transport_header``.

The producer here is aiormq with pamqp's encoder patched (``tests/bad_inputs.py::raw_encoder``) so
that it writes the given bytes as they are, as a producer in another language may.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from replaysafe import App, Context, Effect, Guarantee, QuarantineReason, Worker
from replaysafe.brokers import _amqp_decode
from replaysafe.brokers.rabbitmq import RabbitMQBroker, Topology
from replaysafe.envelope import HEADER_MALFORMED_TRANSPORT, Envelope, decode_wire
from replaysafe.errors import MalformedTransportHeader
from replaysafe.failpoints import Failpoints
from replaysafe.ledger import SQLiteLedger
from replaysafe.testing.netcut import CutRelay

from .bad_inputs import (  # noqa: F401 - raw_encoder is a fixture
    BAD,
    _consumers,
    frame_headers,
    raw_encoder,
    send_frame,
    shortstr,
    table,
    text_entry,
)
from .broker_fixtures import rabbit_source
from .waits import until

RECEIVE = 30.0


@pytest.fixture
async def source(amqp_url: str) -> AsyncIterator[tuple[RabbitMQBroker, str, str]]:
    async with rabbit_source(amqp_url, "rs-malformed", ["g"]) as (broker, name):
        yield broker, name, "g"


@pytest.mark.usefixtures("raw_encoder")
async def test_a_malformed_property_is_quarantined_and_the_queue_keeps_flowing(
    amqp_url: str, source: tuple[RabbitMQBroker, str, str], tmp_path: Path
) -> None:
    import aiormq

    admin, name, group = source
    # the worker's connections go through a relay, which counts every connection it accepts:
    # a reader killed by an undecodable frame would reconnect
    relay = CutRelay.for_url(amqp_url)
    await relay.start()
    failpoints = Failpoints()
    broker = RabbitMQBroker(relay.url(amqp_url), failpoints=failpoints)
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    app = App("malformed", broker=broker, ledger=ledger, failpoints=failpoints)
    applied: list[str] = []

    @app.handler(name, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("probe"),
                 group=group, lease=5.0, concurrency=4)  # fmt: skip
    async def work(ctx: Context) -> None:
        applied.append(ctx.operation_id)

    worker = Worker(app)
    running = asyncio.ensure_future(worker.run(drain_timeout=5))
    producer = await aiormq.connect(amqp_url)
    try:
        channel = await producer.channel()

        async def good(i: int) -> None:
            await send_frame(channel, name, {"headers": {"rs-operation-id": f"good-{i}"}},
                             json.dumps({"i": i}).encode())  # fmt: skip

        await good(0)
        await until(lambda: applied == ["good-0"], seconds=RECEIVE, what="good-0 applied")
        connections = relay.connections  # the worker's publish and consume connections
        for i, (_, props, entries, routing_key, _) in enumerate(BAD, start=1):
            # a distinct rs-operation-id each: a quarantine is keyed by what the transport says
            headers = frame_headers(f"bad-{i}", entries)
            await send_frame(
                channel, name, {**props, "headers": headers}, b'{"id": 1}', routing_key
            )
            await good(i)

        async def done() -> bool:
            entries = await ledger.quarantined(limit=100)
            progress[:] = [len(applied), len(entries), relay.connections]
            return len(applied) == len(BAD) + 1 and len(entries) == len(BAD)

        progress: list[int] = []
        try:
            await until(done, seconds=RECEIVE, what="all applied or quarantined")
        except BaseException:
            print(f"\napplied, quarantined, connections through the relay: {progress}")
            raise
        assert sorted(applied) == sorted(f"good-{i}" for i in range(len(BAD) + 1))
        entries = await ledger.quarantined(limit=100)
        assert {e.reason for e in entries} == {QuarantineReason.MALFORMED_TRANSPORT_HEADER}
        assert all(e.attempts == 1 and e.seen == 1 for e in entries), entries
        details = [e.first_detail for e in entries]
        for label, _, _, _, says in BAD:
            assert sum(says in d for d in details) == 1, (label, says, details)
        # the consumer stayed connected throughout: no reconnect, one consumer on the queue
        assert relay.connections == connections
        assert await _consumers(amqp_url, Topology.of(name, group).queue) == 1
        depths = await admin.queue_depths(name, group)
        assert depths[Topology.of(name, group).queue] == 0
        assert depths[Topology.of(name, group).dead_letter_queue] == 0
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        await producer.close()
        await broker.close()
        await ledger.close()
        await relay.close()


# --------------------------------------------------------------------------- the decoder alone


def _header_frame(properties: bytes, flags: int) -> bytes:
    payload = struct.pack(">HHQ", 60, 0, 5) + struct.pack(">H", flags) + properties
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


@pytest.mark.parametrize(
    ("flags", "properties", "says", "kept"),
    [
        # content_type (0x8000) then headers (0x2000): the headers are still read
        (0xA000, shortstr(b"\xff") + table(text_entry("rs-operation-id", "x")),
         "property content_type: 1 bytes", {"headers": {"rs-operation-id": "x"}}),
        # an unknown field type ends the table (its length is known): what came before stays
        (0x2000, table(text_entry("a", "1") + shortstr(b"z") + b"Z\x00\x00\x00\x01"),
         "header 'z': Unknown type", {"headers": {"a": "1"}}),
        # a table longer than its frame: the properties after it are not read
        (0x2040, struct.pack(">I", 999) + b"\x00", "property headers: field table longer",
         {"headers": None, "timestamp": None}),
    ],
)  # fmt: skip
def test_the_tolerant_decoder_keeps_what_it_can_and_says_what_it_could_not(
    flags: int, properties: bytes, says: str, kept: dict[str, Any]
) -> None:
    """Malformations RabbitMQ 3.10.8 itself refuses at publish (so the end-to-end test cannot
    send them) still never raise out of the decoder."""
    from pamqp import frame

    RabbitMQBroker()  # installs the tolerant decoder
    _, _, header = frame.unmarshal(_header_frame(properties, flags))
    props: Any = header.properties  # type: ignore[union-attr]
    found = _amqp_decode.undecodable(props)
    assert len(found) == 1 and says in found[0], found
    for name, value in kept.items():
        assert getattr(props, name) == value


def test_a_deliver_frame_with_a_bad_routing_key_decodes_and_a_broken_one_still_raises() -> None:
    from pamqp import commands, exceptions, frame

    RabbitMQBroker()
    args = shortstr(b"ctag") + struct.pack(">Q", 7) + b"\x01" + shortstr(b"ex")
    method = struct.pack(">I", commands.Basic.Deliver.index)
    payload = method + args + shortstr(b"\xff\xfe")
    raw = struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"
    _, _, deliver = frame.unmarshal(raw)
    assert isinstance(deliver, commands.Basic.Deliver)
    assert (deliver.consumer_tag, deliver.delivery_tag, deliver.redelivered) == ("ctag", 7, True)
    assert deliver.routing_key == "\ufffd\ufffd"
    assert _amqp_decode.undecodable(deliver) == (
        "routing_key: 2 bytes that are not UTF-8 (b'\\xff\\xfe')",
    )
    # a frame cut short is not a matter of text: refused as before
    payload = method + args + b"\x05\xff"
    raw = struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"
    with pytest.raises(exceptions.UnmarshalingException):
        frame.unmarshal(raw)


def test_a_frame_that_decodes_is_untouched() -> None:
    from pamqp import commands, frame, header

    RabbitMQBroker()
    props = commands.Basic.Properties(content_type="application/json", headers={"a": 1})
    raw = frame.marshal(header.ContentHeader(body_size=3, properties=props), 1)
    _, _, decoded = frame.unmarshal(raw)
    assert decoded.properties == props  # type: ignore[union-attr]
    assert _amqp_decode.undecodable(decoded.properties) == ()  # type: ignore[union-attr]


def test_decoding_refuses_a_delivery_marked_undecodable() -> None:
    body = b'{"id": 1}'
    with pytest.raises(MalformedTransportHeader, match="timestamp") as refused:
        decode_wire(body, {HEADER_MALFORMED_TRANSPORT: "property timestamp: ...",
                           "rs-operation-id": "x"})  # fmt: skip
    assert refused.value.reason is QuarantineReason.MALFORMED_TRANSPORT_HEADER
    # producers cannot set it: it is reserved
    with pytest.raises(ValueError, match="reserved"):
        Envelope.of("x", {}, headers={HEADER_MALFORMED_TRANSPORT: "no"})


def test_pamqp_is_patched_once_by_threads_that_install_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Brokers constructed on several threads at once install the tolerant decoder once: each
    of pamqp's decoders is wrapped exactly once (not a wrapper of a wrapper)."""
    import threading
    import time

    from pamqp import commands, header

    def original(self: Any, data: bytes) -> None: ...

    classes = [header.ContentHeader, *(getattr(commands.Basic, n) for n in ("Deliver", "GetOk",
                                                                          "Return"))]  # fmt: skip
    for cls in classes:
        monkeypatch.setattr(cls, "unmarshal", original)
    monkeypatch.setattr(_amqp_decode, "_installed", False)  # as in a fresh process
    real = _amqp_decode._tolerant_method

    def slow(method: Callable[[Any, bytes], None]) -> Callable[[Any, bytes], None]:
        time.sleep(0.05)  # widens the window in which another thread could start installing
        return real(method)

    monkeypatch.setattr(_amqp_decode, "_tolerant_method", slow)
    threads = [threading.Thread(target=_amqp_decode.install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [cls.unmarshal.__wrapped__ for cls in classes] == [original] * len(classes)
