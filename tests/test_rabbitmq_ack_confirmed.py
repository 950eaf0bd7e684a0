"""``RabbitMQDelivery.ack_confirmed()`` (issue 13 item 2): at-most-once runs its effect once the
ack is confirmed, so a process killed right after it must never see the message come back.

AMQP 0-9-1 has no ack confirm. ``ack_confirmed()`` used to return once the ``basic.ack`` frame was
written to the socket; a SIGKILL right after it lost the ack whenever the bytes had not yet been
processed by RabbitMQ, and the message was redelivered and charged by another worker (the demo's
at-most-once row: ``crash_before_charge`` hit 3 times, lost 0 of them). The adapter now follows
the ack with one synchronous method on the same channel and returns once RabbitMQ answered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from replaysafe import Envelope
from replaysafe.brokers.rabbitmq import RabbitMQBroker, RabbitMQDelivery
from replaysafe.envelope import HEADER_OPERATION_ID
from replaysafe.errors import BrokerUnavailable
from replaysafe.failpoints import Failpoints
from replaysafe.testing.netcut import CutRelay

from .broker_fixtures import rabbit_source
from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
#: SIGKILLs right after ack_confirmed() returned (issue 13 asks for 200; ~20-40 s here)
ROUNDS = 200
#: children alive at a time (the machine has 2 cores, shared)
PARALLEL = 2
RECEIVE = 15.0
#: seconds the queue must stay empty before a drain counts as complete
QUIET = 1.0


@pytest.fixture
async def source(amqp_url: str) -> AsyncIterator[tuple[RabbitMQBroker, str, str]]:
    async with rabbit_source(amqp_url, "rs-ackc", ["g"]) as (broker, name):
        yield broker, name, "g"


def _envelopes(n: int) -> list[Envelope]:
    now = time.time()
    return [Envelope.of(f"op-{i}", {"i": i}, published_at=now) for i in range(n)]


async def _drain(broker: RabbitMQBroker, name: str, group: str, expect: int) -> list[str]:
    """Every operation id left in the group's queue, each acked: read until ``expect`` came,
    then on until the queue has been empty, with nothing buffered or unsettled, for ``QUIET``
    seconds in a row (all within ``RECEIVE``), so that a late redelivery is counted instead of
    being left behind unseen; the queue must then be empty."""
    sub = await broker.subscribe(name, group, prefetch=64)
    ops: list[str] = []
    loop = asyncio.get_running_loop()

    async def take(batch: list[Any]) -> bool:
        for d in batch:
            ops.append(d.headers[HEADER_OPERATION_ID])
            await d.ack()
        return bool(batch)

    try:
        async with asyncio.timeout(RECEIVE):
            while len(ops) < expect:
                await take(await sub.next_batch(64))
            quiet_since = loop.time()
            while loop.time() - quiet_since < QUIET:
                try:
                    async with asyncio.timeout(0.2):  # a cancelled next_batch loses nothing
                        batch = await sub.next_batch(64)
                except TimeoutError:
                    batch = []
                got = await take(batch)
                ready = (await broker.queue_depths(name, group))[f"{name}/{group}"]
                if got or ready or broker.in_flight():
                    quiet_since = loop.time()
    finally:
        await sub.close()
    depths = await broker.queue_depths(name, group)
    assert depths[f"{name}/{group}"] == 0, (depths, "messages arrived after the drain")
    return ops


async def test_a_sigkill_right_after_ack_confirmed_never_brings_the_message_back(
    amqp_url: str, source: tuple[RabbitMQBroker, str, str], tmp_path: Path
) -> None:
    """200 worker processes, each: one delivery, ``ack_confirmed()``, SIGKILL at once (no loop
    iteration in between). Each one's connections go through a relay inside the process, which
    dies with it (as in the demo's workers): a byte it had not forwarded is lost, as one in a
    socket buffer or a busy channel process is. Unfixed, every round's ack was lost that way
    (measured: 50 redelivered of 50); on an idle loopback without the relay, 0 of 250."""
    broker, name, group = source
    sent = _envelopes(ROUNDS + 10)  # each child's prefetch also buffers one, which comes back
    await broker.publish(name, sent)
    log = tmp_path / "rounds.log"
    started = time.monotonic()
    # its own session: the parent and its forked children are one process group, killed
    # together if this test stops waiting for them (else they keep consuming the queue)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.apps.rabbit_ack_kill", amqp_url, name, group, str(ROUNDS),
        str(log), str(PARALLEL), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    except BaseException:  # a timeout, a cancellation: no child may outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=10)
        raise
    seconds = time.monotonic() - started
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert proc.returncode == 0, (lines[-5:], err.decode()[-2000:])
    acked: list[str] = [ln[1] for ln in lines if ln[0] == "acked"]
    assert not [ln for ln in lines if ln[0] in ("idle", "stuck")], lines
    # every round hit its window: the ack was confirmed, then the process died
    assert len(acked) == ROUNDS, [ln for ln in lines if ln[0] != "got"][:5]
    # no round got a message an earlier one had acked ...
    seen: set[str] = set()
    again = []
    for ln in lines:
        if ln[0] == "got" and ln[1] in seen:
            again.append(ln[1])
        elif ln[0] == "acked":
            seen.add(ln[1])
    # ... nor is one left in the queue
    left = await _drain(broker, name, group, len(sent) - len(seen))
    again += [op for op in left if op in seen]
    print(f"\n{ROUNDS} SIGKILLs after ack_confirmed in {seconds:.1f}s: {len(again)} redelivered")
    assert again == [], f"{len(again)} acked messages came back, e.g. {again[:3]}"
    # what is left is exactly what was never acked: 200 different messages were acked
    assert len(seen) == ROUNDS
    assert sorted(left) == sorted(e.operation_id for e in sent if e.operation_id not in seen)


def _spy(
    channel: Any, monkeypatch: pytest.MonkeyPatch, qos_sent: asyncio.Event | None = None
) -> list[tuple[str, int, bool]]:
    """Record every basic.ack and basic.qos sent on ``channel``, in order; set ``qos_sent`` once
    a basic.qos is being sent."""
    frames: list[tuple[str, int, bool]] = []
    real_ack, real_qos = channel.basic_ack, channel.basic_qos

    async def ack(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        frames.append(("ack", delivery_tag, multiple))
        await real_ack(delivery_tag=delivery_tag, multiple=multiple, wait=wait)

    async def qos(**kw: Any) -> Any:
        frames.append(("qos", kw["prefetch_count"], False))
        if qos_sent is not None:
            qos_sent.set()
        return await real_qos(**kw)

    monkeypatch.setattr(channel, "basic_ack", ack)
    monkeypatch.setattr(channel, "basic_qos", qos)
    return frames


async def test_a_batch_of_ack_confirmed_costs_one_round_trip(
    source: tuple[RabbitMQBroker, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The at-most-once deliveries of one batch confirm their acks together: one multiple ack
    and ONE round trip after it, not one per message; a later call waits for a round trip of
    its own (the shared one may have been sent before its ack)."""
    broker, name, group = source
    sub = await broker.subscribe(name, group, prefetch=8)
    await broker.publish(name, _envelopes(7))
    batch: list[RabbitMQDelivery] = []
    async with asyncio.timeout(RECEIVE):
        while len(batch) < 7:
            batch += [d for d in await sub.next_batch(8) if isinstance(d, RabbitMQDelivery)]
    batch.sort(key=lambda d: d.tag)
    frames = _spy(batch[0].message.channel, monkeypatch)
    await asyncio.gather(*(d.ack_confirmed() for d in batch[:6]))
    assert frames == [("ack", batch[5].tag, True), ("qos", 16, False)]
    await batch[6].ack_confirmed()
    assert frames[2:] == [("ack", batch[6].tag, True), ("qos", 16, False)]
    assert broker.in_flight() == 0
    await sub.close()
    assert (await broker.queue_depths(name, group))[f"{name}/{group}"] == 0


async def test_ack_confirmed_raises_when_the_channel_dies_before_rabbitmq_answers(
    amqp_url: str, source: tuple[RabbitMQBroker, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ack went out but the answer to the round trip never came (the connection was cut
    while the relay held the server's replies): not confirmed, so at-most-once must not run the
    effect. ``ack_confirmed`` raises instead of returning."""
    broker, name, group = source
    relay = CutRelay.for_url(amqp_url)
    await relay.start()
    via = RabbitMQBroker(relay.url(amqp_url), failpoints=Failpoints(), reconnect_interval=0.2)
    try:
        sub = await via.subscribe(name, group, prefetch=1)
        await broker.publish(name, _envelopes(1))
        async with asyncio.timeout(RECEIVE):
            d = await anext(sub)
        assert isinstance(d, RabbitMQDelivery)
        qos_sent = asyncio.Event()
        frames = _spy(d.message.channel, monkeypatch, qos_sent)
        relay.hold_replies()
        confirming = asyncio.ensure_future(d.ack_confirmed())
        # cut only once the round trip is under way: the ack frame was written (the qos is
        # sent after it) and qos-ok is held in the relay. Cut earlier, and the error would be
        # "was not written", another case
        await asyncio.wait_for(qos_sent.wait(), RECEIVE)
        assert frames[0] == ("ack", d.tag, True), frames
        assert not confirming.done()
        relay.cut()
        with pytest.raises(BrokerUnavailable, match="closed before RabbitMQ confirmed"):
            async with asyncio.timeout(RECEIVE):
                await confirming
        assert d.settled and via.in_flight() == 0
    finally:
        relay.release()
        await via.close()
        await relay.close()


async def test_ack_confirmed_raises_and_says_so_when_rabbitmq_does_not_answer_in_time(
    amqp_url: str, source: tuple[RabbitMQBroker, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The ack went out but the answer to the round trip does not come within
    ``confirm_timeout`` (the relay holds it): not confirmed, and the warning says it timed out
    (not that the channel closed for some other reason)."""
    broker, name, group = source
    relay = CutRelay.for_url(amqp_url)
    await relay.start()
    via = RabbitMQBroker(relay.url(amqp_url), failpoints=Failpoints(), confirm_timeout=1.0)
    try:
        sub = await via.subscribe(name, group, prefetch=1)
        await broker.publish(name, _envelopes(1))
        async with asyncio.timeout(RECEIVE):
            d = await anext(sub)
        relay.hold_replies()
        with (
            caplog.at_level("WARNING", logger="replaysafe.brokers.rabbitmq"),
            pytest.raises(BrokerUnavailable, match="closed before RabbitMQ confirmed"),
        ):
            async with asyncio.timeout(RECEIVE):
                await d.ack_confirmed()
        assert f"did not confirm the acks sent on {name}/{group} within 1s" in caplog.text
        assert d.settled and via.in_flight() == 0
    finally:
        relay.release()
        await via.close()
        await relay.close()
