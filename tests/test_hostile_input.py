"""Issue 13 "Done when": the hostile inputs, sent by plain clients to a running worker on
RabbitMQ + PostgreSQL, are each quarantined with a reason, the queues are empty at the end, every
good message is applied once and the worker consumes throughout.

What the issue did, in one test: a plain aio-pika producer (no replaysafe ``Producer``) publishes
to the exchanges ``declare_topology`` created, bad messages interleaved with good ones, to ONE
in-process worker (a ``PostgresLedger`` in a fresh schema, ``App(redact=...)``) with two
effectively-once keyed handlers:

- ``ingest`` identifies operations by the ``rs-operation-id`` header (no key extractor). It gets
  every DESIGN §5 case (``tests/bad_inputs.py::_cases``) and item 13's AMQP frames the
  client cannot decode (``tests/bad_inputs.py::BAD``, written raw
  through aio-pika's own aiormq channel with pamqp's encoder patched, as a producer in another
  language may).
- ``charge`` derives them with a key extractor (``("charge", p["id"])``). It gets item 14 (NUL and
  bytes that are not UTF-8 in the content type and in header values), item 15 (headers that
  disagree with the extractor, both sequences of the issue) and item 16 (e-mails in bodies,
  details and keys; a redaction hook that raises on some bodies).

The worker is in process, not a ``replaysafe run`` subprocess: the checks need its log records
(caplog), its counters and the effect probe. That it keeps consuming is checked at the broker: its
connections go through a :class:`~replaysafe.testing.netcut.CutRelay` that counts every
connection it accepts (a reader killed by a bad frame reconnects), and each queue shows one
consumer at every checkpoint. Real time, bounded waits; no assertion is about speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest

from replaysafe import (
    App,
    Context,
    Effect,
    Guarantee,
    QuarantineReason,
    RetryPolicy,
    Worker,
    declare_topology,
)
from replaysafe import observe as o
from replaysafe.brokers.rabbitmq import RabbitMQBroker, Topology
from replaysafe.envelope import (
    HEADER_FINGERPRINT,
    HEADER_OPERATION_ID,
    HEADER_PUBLISHED_AT,
    format_time,
)
from replaysafe.failpoints import Failpoints
from replaysafe.ledger.base import MAX_QUARANTINE_COPY
from replaysafe.ledger.postgres import PostgresLedger
from replaysafe.observe.prometheus import render
from replaysafe.testing import EffectProbe
from replaysafe.testing.netcut import CutRelay

from .bad_inputs import (  # noqa: F401 - raw_encoder is a fixture
    BAD,
    _cases,
    _consumers,
    frame_headers,
    raw_encoder,
    send_frame,
)
from .runtime_harness import mask_emails
from .waits import until

#: real seconds for everything sent to be applied or quarantined (a shared, slow machine)
SETTLE = 60.0
#: polls (0.3 s apart) with empty queues and no change that end the wait early
STABLE = 15
#: a body holding this makes the app's redaction hook raise (item 16a)
UNREDACTABLE = "no-redact"
#: every e-mail sent is at this domain (a substring test: linear on a 1 MiB body)
EMAIL = "@example.com"

EO = Guarantee.EFFECTIVELY_ONCE
R = QuarantineReason


class Declined(Exception):
    """The payments API refused the charge (not retried: quarantined at once)."""


def redact(body: bytes) -> bytes:
    """The app's hook: masks e-mails, and raises on some bodies as a hook that parses them
    might (its message quotes the body: it must never be logged)."""
    if UNREDACTABLE.encode() in body:
        raise ValueError(f"cannot redact {body!r}")
    return mask_emails(body)


def doc(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class Bad(NamedTuple):
    """A message a plain client sends that must be refused (a bytearray header value is sent
    as an AMQP byte array), and the good one sent right after it (None: a plain one)."""

    case: str
    body: bytes
    headers: dict[str, Any]
    ctype: str | None
    reason: QuarantineReason
    then: tuple[bytes, dict[str, Any]] | None = None


def ingest_cases() -> list[Bad]:
    """Sent to ``ingest`` (no key extractor) besides DESIGN §5 and the undecodable frames."""
    same = doc(order="dup", amount=1)
    return [
        # item 14 on RabbitMQ: decoded with U+FFFD, both ids were "ingest:dup-\ufffd": the first
        # was applied and the second answered as its duplicate, never applied
        Bad("bytes not UTF-8 in rs-operation-id", same,
            {HEADER_OPERATION_ID: bytearray(b"ingest:dup-\xff")}, None,
            R.MALFORMED_TRANSPORT_HEADER),
        Bad("other bytes not UTF-8 in rs-operation-id", same,
            {HEADER_OPERATION_ID: bytearray(b"ingest:dup-\xfe")}, None,
            R.MALFORMED_TRANSPORT_HEADER),
    ]  # fmt: skip


def charge_cases(now: float) -> list[Bad]:
    """Sent to ``charge`` (key extractor ``("charge", p["id"])``)."""
    nan = b'{"id": 9602, "email": "cy@example.com", "amount": NaN}'
    return [
        # item 14: text PostgreSQL cannot store as it is (was: LedgerUnavailable, nacked forever)
        Bad("NUL in the content type", doc(id=9401, amount=1), {}, "application/json\x00",
            R.UNSUPPORTED_CONTENT_TYPE),
        Bad("NUL in rs-operation-id", doc(id=9402, amount=1),
            {HEADER_OPERATION_ID: "charge:9402\x00"}, None, R.OPERATION_ID_MISMATCH),
        Bad("bytes not UTF-8 in rs-operation-id", doc(id=9403, amount=1),
            {HEADER_OPERATION_ID: bytearray(b"charge:9403\xff")}, None,
            R.MALFORMED_TRANSPORT_HEADER),
        # CPython 3.11 read it as the time before the NUL: applied
        Bad("NUL in rs-published-at", doc(id=9404, amount=1),
            {HEADER_PUBLISHED_AT: format_time(now) + "\x00"}, None, R.MALFORMED_HEADER),
        Bad("bytes not UTF-8 in rs-published-at", doc(id=9405, amount=1),
            {HEADER_PUBLISHED_AT: bytearray(format_time(now).encode() + b"\xff")}, None,
            R.MALFORMED_TRANSPORT_HEADER),
        Bad("NUL in rs-fingerprint", doc(id=9406, amount=1),
            {HEADER_FINGERPRINT: "sha256:\x00"}, None, R.FINGERPRINT_MISMATCH,
            then=(doc(id=9409, amount=10), {HEADER_OPERATION_ID: "charge:9409"})),  # agrees
        # ordinary headers may hold anything: bad input next to them is refused as such, and a
        # good message carrying them is applied
        Bad("NUL and bytes not UTF-8 in other headers", b'{"id": 9407, "amount": ',
            {"x-note": "a\x00b", "note": bytearray(b"\xff\xfe"), "n\x00me": "v"}, None,
            R.MALFORMED_PAYLOAD,
            then=(doc(id=9408, amount=10), {"x-note": "a\x00b", "note": bytearray(b"\xff")})),
        # item 15: a header naming ANOTHER operation was applied as charge:45, and the real 45
        # then refused as a key-reuse conflict
        Bad("header names another operation", doc(id=9016, amount=10),
            {HEADER_OPERATION_ID: "charge:45"}, None, R.OPERATION_ID_MISMATCH,
            then=(doc(id=45, amount=10), {})),
        # ... one in another namespace was applied, then the plain 9017 applied again
        Bad("header in another namespace", doc(id=9017, amount=10),
            {HEADER_OPERATION_ID: "custom:9017"}, None, R.OPERATION_ID_MISMATCH,
            then=(doc(id=9017, amount=10), {})),
        # item 16: e-mails in what a quarantine writes down, and a hook that raises
        Bad("e-mail in a declined charge", doc(id=9601, amount=-1, email="ann@example.com"), {},
            None, R.NON_RETRYABLE_ERROR),
        Bad("e-mail as the business key", doc(id="bob@example.com", amount=-1), {}, None,
            R.NON_RETRYABLE_ERROR),
        Bad("e-mail in bad input", nan, {}, None, R.MALFORMED_PAYLOAD),
        Bad("hook raises on a declined charge",
            doc(id=9603, amount=-1, email="dee@example.com", note=UNREDACTABLE), {}, None,
            R.NON_RETRYABLE_ERROR),
        Bad("hook raises on bad input",
            b'{"id": 9604, "email": "eve@example.com", "note": "' + UNREDACTABLE.encode() + b'"',
            {}, None, R.MALFORMED_PAYLOAD),
    ]  # fmt: skip


@pytest.fixture
async def sources(amqp_url: str) -> AsyncIterator[tuple[str, str]]:
    """Two fresh source names; whatever was declared for them is deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    ingest, charge = f"rs-hostile-{tag}", f"rs-hostile-{tag}-keyed"
    yield ingest, charge
    admin = RabbitMQBroker(amqp_url, failpoints=Failpoints())
    try:
        await admin.delete(ingest, ["hostile.ingest"])
        await admin.delete(charge, ["hostile.charge"])
    finally:
        await admin.close()


@pytest.mark.usefixtures("raw_encoder")
async def test_hostile_input_end_to_end_on_rabbitmq_and_postgres(
    amqp_url: str,
    pg_dsn: str,
    pg_schema: str,
    sources: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import aio_pika

    ingest_source, charge_source = sources
    relay = CutRelay.for_url(amqp_url)
    await relay.start()
    broker = RabbitMQBroker(relay.url(amqp_url), failpoints=Failpoints())
    ledger = PostgresLedger(pg_dsn, schema=pg_schema)
    await ledger.migrate()
    app = App("hostile", broker=broker, ledger=ledger, redact=redact)
    probe = EffectProbe(honour_keys=False)  # strict: every call of the effect counts

    @app.handler(ingest_source, guarantee=EO, effect=Effect.keyed("ingest"), lease=10)
    async def ingest(ctx: Context) -> str:
        return await probe.apply(ctx.operation_id, None, ctx.idempotency_key)

    declines = RetryPolicy(give_up_on=(Declined,))

    @app.handler(charge_source, guarantee=EO, effect=Effect.keyed("payments"), lease=10,
                 key=lambda p: ("charge", p["id"]), retry=declines)  # fmt: skip
    async def charge(ctx: Context) -> str:
        p = ctx.payload
        if p["amount"] < 0:
            raise Declined(f"card of {p.get('email', p['id'])} declined")  # quotes the e-mail
        return await probe.apply(ctx.operation_id, p["amount"], ctx.idempotency_key)

    await declare_topology(app)
    queues = {name: Topology.of(spec.source, spec.group) for name, spec in app.handlers.items()}
    now = time.time()
    dsn_cases = _cases(now)
    extra = ingest_cases()
    ours = charge_cases(now)
    # the expected quarantine entries, per handler and reason
    expected = Counter(
        [("ingest", reason) for _, reason in dsn_cases.values()]
        + [("ingest", bad.reason) for bad in extra]
        + [("ingest", R.MALFORMED_TRANSPORT_HEADER)] * len(BAD)
        + [("charge", bad.reason) for bad in ours]
    )
    good_ops: list[str] = []

    caplog.set_level(logging.WARNING, logger="replaysafe")
    worker = Worker(app)
    running = asyncio.ensure_future(worker.run(drain_timeout=10))
    producer = await aio_pika.connect(amqp_url)
    try:
        channel = await producer.channel()  # publisher confirms: each publish is stored
        to_ingest = await channel.get_exchange(ingest_source)
        to_charge = await channel.get_exchange(charge_source)
        raw = await channel.get_underlay_channel()

        async def plain(ex: Any, body: bytes, headers: dict[str, Any], ctype: str | None) -> None:
            await ex.publish(aio_pika.Message(body, headers=headers, content_type=ctype), "")

        async def good_ingest() -> None:
            op = f"ingest:good-{len(good_ops)}"
            good_ops.append(op)
            await plain(to_ingest, doc(order=op, amount=10), {HEADER_OPERATION_ID: op}, None)

        async def good_charge(body: bytes | None = None, headers: dict[str, Any] | None = None
                              ) -> None:  # fmt: skip
            body = body or doc(id=1000 + len(good_ops), amount=10)
            good_ops.append(f"charge:{json.loads(body)['id']}")
            await plain(to_charge, body, headers or {}, None)

        async def consuming(what: str) -> None:
            """The worker's connections are the ones it opened at start (none died and came
            back) and each queue has its one consumer."""
            assert relay.connections == connections, f"{what}: the worker reconnected"
            for name, topo in queues.items():
                assert await _consumers(amqp_url, topo.queue) == 1, f"{what}: {name}"

        # warm up: both consumers are running before the first bad message
        await good_ingest()
        await good_charge()
        await until(lambda: len(probe.effects) == 2, seconds=SETTLE, what="first goods applied")
        connections = relay.connections
        await consuming("before the bad input")

        for body, headers in (case for case, _ in dsn_cases.values()):
            headers = dict(headers)
            await plain(to_ingest, body, headers, headers.pop("content-type", None))
            await good_ingest()
        for bad in extra:
            await plain(to_ingest, bad.body, bad.headers, bad.ctype)
            await good_ingest()
        for i, (_, props, entries, routing_key, _) in enumerate(BAD):
            frame = {**props, "headers": frame_headers(f"ingest:frame-{i}", entries)}
            await send_frame(raw, ingest_source, frame, doc(order=i, amount=1), routing_key)
            await good_ingest()
        await consuming("amid the bad input")
        for bad in ours:
            await plain(to_charge, bad.body, bad.headers, bad.ctype)
            await good_charge(*(bad.then or ()))

        admin = RabbitMQBroker(amqp_url, failpoints=Failpoints())
        try:

            async def poll() -> list[int]:
                """[effects, quarantine entries, ready in the group's queues, held by the
                worker]"""
                depths = [await admin.queue_depths(s.source, s.group)
                          for s in app.handlers.values()]  # fmt: skip
                entries = await ledger.quarantined(limit=1000)
                ready = sum(sum(d.values()) for d in depths)
                return [len(probe.effects), len(entries), ready, broker.in_flight()]

            wanted = [len(good_ops), expected.total(), 0, 0]

            def finished(seen: list[list[int]]) -> bool:
                """What was expected, three polls in a row (a settle in progress must have
                reached RabbitMQ); or nothing left anywhere and no change for STABLE polls
                (the assertions below then say what differs, without waiting for SETTLE)."""
                last = seen[-STABLE:]
                return seen[-3:] == [wanted] * 3 or (
                    len(last) == STABLE
                    and last[-1][2:] == [0, 0]
                    and last.count(last[-1]) == STABLE
                )

            seen: list[list[int]] = []
            deadline = time.monotonic() + SETTLE
            while not finished(seen):
                assert not running.done(), "the worker stopped"
                assert time.monotonic() < deadline, (
                    f"not settled within {SETTLE}s: effects, quarantined, ready in the queues, "
                    f"held by the worker = {seen[-1:]}; wanted {wanted}"
                )
                await asyncio.sleep(0.3)
                seen.append(await poll())
            await consuming("after the bad input")
            # the queue, its dead-letter queue and every retry queue are empty
            for spec in app.handlers.values():
                depths = await admin.queue_depths(spec.source, spec.group)
                assert depths[queues[spec.name].dead_letter_queue] == 0
                assert sum(depths.values()) == 0, depths
        finally:
            await admin.close()
        entries = await ledger.quarantined(limit=1000)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)  # raises if the worker crashed
        await producer.close()
        await broker.close()
        await relay.close()
        await ledger.close()

    # every good message applied exactly once (the probe counts every call)
    assert probe.per_subject() == Counter(good_ops)
    assert probe.calls == len(good_ops)
    # every bad one quarantined with its reason, decided on its first attempt
    assert Counter((e.scope, e.reason) for e in entries) == expected
    for e in entries:
        assert (e.attempts, e.seen) == (1, 1), e
        assert e.message is None or len(e.message) <= MAX_QUARANTINE_COPY
        # item 16b: nothing stored carries an e-mail (the operation id column may: redrive
        # needs it, and it is the ledger's key)
        stored = f"{e.first_detail} {e.last_detail} {e.message!r} {e.content_type}"
        assert EMAIL not in stored, e
    charge_entries = [e for e in entries if e.scope == "charge"]
    # item 14: PostgreSQL keeps the content type with its NUL escaped
    assert "application/json\\x00" in {e.content_type for e in charge_entries}
    # item 15: the headers that disagreed are named, and neither was applied
    for header in ("'charge:45'", "'custom:9017'"):
        assert sum(header in e.first_detail for e in charge_entries) == 1, header
    # item 16a: the hook raised on two bodies: no copy kept, the entries say so
    withheld = [e for e in charge_entries if e.message is None]
    assert len(withheld) == 2
    assert all("redaction hook raised ValueError" in e.first_detail for e in withheld)
    # item 16b: the copies that were kept are masked
    declined = [
        e for e in charge_entries if e.first_detail == "Declined('card of <email> declined')"
    ]
    assert {e.message for e in declined} == {
        b'{"id": 9601, "amount": -1, "email": "<email>"}',
        b'{"id": "<email>", "amount": -1}',
    }

    # item 13: each undecodable frame said what could not be decoded
    details = [e.first_detail for e in entries if e.reason is R.MALFORMED_TRANSPORT_HEADER]
    for label, *_, says in BAD:
        assert sum(says in d for d in details) == 1, (label, says)

    # nothing retried, nothing failed, the ledger never reported down (items 14, 16a)
    stats = worker.stats
    outcomes: Counter[str] = Counter()
    for (name, labels), n in stats.counters.items():
        if name == o.DELIVERIES:
            outcomes[dict(labels)["outcome"]] += n
    assert outcomes == {o.APPLIED: len(good_ops), o.QUARANTINE: expected.total()}
    assert stats.total(o.RETRIES) == 0
    assert stats.total(o.LEDGER_UNAVAILABLE) == 0
    assert stats.total(o.REDELIVERIES) == 0

    # item 16b: neither the log lines nor the exposition carry an e-mail
    lines = [r.getMessage() for r in caplog.records]
    assert lines and not [m for m in lines if EMAIL in m]
    assert EMAIL not in render(lambda: [stats])
    quarantined = [m for m in lines if "quarantined entry" in m]
    assert len(quarantined) == expected.total()
    assert sum("operation charge:<email>" in m for m in quarantined) == 1
    # replaysafe's own ERROR records: a driver's (aiormq logs reconnects) is not what is counted
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and (r.name + ".").startswith("replaysafe.")
    ]
    assert len(errors) == 2 and all("redaction hook raised ValueError" in m for m in errors)
