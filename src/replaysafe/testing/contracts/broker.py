"""``BrokerContract``: the conformance suite every broker adapter passes.

A backend's test module subclasses it (with a ``Test`` prefix so pytest collects it) and provides
:meth:`BrokerContract.make_broker`; each case then runs against a fresh source and consumer
groups. What a case asserts comes from the ``Capabilities`` the broker declares for that source --
a case is skipped only when the capabilities say the behaviour does not exist, never through an
ad-hoc flag::

    class TestMyBroker(BrokerContract):
        async def make_broker(self, clock: Clock) -> Broker:
            return MyBroker(url=..., clock=clock)

        async def prepare_source(self, broker: Broker, source: str) -> None:
            await broker.create_queue(source)   # whatever the backend needs

Time: the default clock is a :class:`~replaysafe.testing.FakeClock` and :meth:`advance` moves it.
Adapters for real servers override :meth:`make_clock` (``SYSTEM_CLOCK``), :meth:`advance` and
:meth:`quiesce` with real sleeps, and declare short timers (visibility of 1-2 s): the cases move
time relative to ``Delivery.settle_deadline`` plus :attr:`timer_margin`, never by fixed amounts.

Failpoints: the ambiguous-publish case arms ``PUBLISH_AFTER_ACCEPT`` on the registry returned by
:meth:`failpoints_of` (the broker's ``failpoints`` attribute, else the process-wide registry), so an
adapter passes it by hitting that failpoint right after the server accepted each envelope.

Every wait is bounded: :attr:`receive_timeout` for an expected delivery, :meth:`quiesce` for
"nothing arrives".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from replaysafe.brokers.base import Broker, Capabilities, Delivery, RedeliveryKind, Subscription
from replaysafe.clock import Clock
from replaysafe.envelope import RESERVED_HEADERS, Envelope, decode_wire
from replaysafe.errors import BrokerError, CapabilityError, PublishAmbiguous
from replaysafe.failpoints import FAILPOINTS, PUBLISH_AFTER_ACCEPT, Failpoints
from replaysafe.testing import FakeClock

__all__ = ["BrokerCase", "BrokerContract"]


def decode(d: Delivery) -> Envelope:
    """Decode a delivery the way the runtime does."""
    return decode_wire(
        d.body,
        d.headers,
        content_type=d.content_type,
        key=d.key,
        broker_timestamp=d.broker_timestamp,
    )


@dataclass
class BrokerCase:
    """One case's world: clock, broker, a fresh source and the capabilities declared for it."""

    contract: BrokerContract
    clock: Clock
    broker: Broker
    source: str
    caps: Capabilities
    prefix: str = field(default_factory=lambda: f"contract-{uuid.uuid4().hex[:10]}")
    subs: list[Subscription] = field(default_factory=list)

    def group(self) -> str:
        """A fresh consumer group name."""
        return f"g-{uuid.uuid4().hex[:10]}"

    def envelope(self, n: int | str, *, key: str | None = None, **extra: Any) -> Envelope:
        value: dict[str, Any] = {"n": n, **extra}
        return Envelope.of(f"{self.prefix}:{n}", value, key=key, published_at=self.clock.now())

    async def subscribe(self, group: str, *, prefetch: int = 16) -> Subscription:
        sub = await self.broker.subscribe(self.source, group, prefetch=prefetch)
        self.subs.append(sub)
        return sub

    async def publish(self, *envelopes: Envelope) -> None:
        await self.broker.publish(self.source, list(envelopes))

    async def advance(self, seconds: float) -> None:
        await self.contract.advance(self.clock, seconds)

    async def receive(self, sub: Subscription) -> Delivery:
        """The next delivery, or fail after ``receive_timeout`` seconds of real time."""
        try:
            async with asyncio.timeout(self.contract.receive_timeout):
                return await anext(sub)
        except TimeoutError:
            pytest.fail(f"no delivery on {self.source!r} within {self.contract.receive_timeout} s")

    async def receive_many(self, sub: Subscription, n: int, *, ack: bool = True) -> list[Delivery]:
        out = []
        for _ in range(n):
            d = await self.receive(sub)
            if ack:
                await d.ack()
            out.append(d)
        return out

    def past(self, d: Delivery) -> float:
        """Seconds to move the clock so that any timer ``d`` carried has expired."""
        margin = self.contract.timer_margin
        if d.settle_deadline is None:
            return margin
        return max(0.0, d.settle_deadline - self.clock.now()) + margin

    async def expect_nothing(self, sub: Subscription, *, advance: float = 0.0) -> None:
        """Assert that ``sub`` yields nothing, also after moving the clock by ``advance``."""
        task = asyncio.ensure_future(anext(sub))
        try:
            await self.contract.quiesce(self.clock)
            if advance > 0:
                await self.advance(advance)
                await self.contract.quiesce(self.clock)
        finally:
            task.cancel()
            # wait rather than await: our own cancellation must still propagate
            await asyncio.wait({task})
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, StopAsyncIteration):
            return
        if exc is not None:
            raise exc
        d = task.result()
        pytest.fail(
            f"unexpected delivery of {decode(d).operation_id!r} (attempt {d.attempt}, "
            f"redelivered={d.redelivered}) on {self.source!r}"
        )


class BrokerContract:
    """Conformance cases for a :class:`~replaysafe.brokers.base.Broker` (see module docstring)."""

    pytestmark = pytest.mark.asyncio

    #: real seconds to wait for a delivery that must arrive
    receive_timeout: float = 10.0
    #: how far past (or short of) a broker timer the cases move time before asserting
    timer_margin: float = 0.5
    #: delay used by the delayed-nack case (keep it short for real servers)
    nack_delay: float = 2.0

    # ------------------------------------------------------------------ hooks

    async def make_broker(self, clock: Clock) -> Broker:
        """A new broker that reads ``clock`` for its timers. Subclasses must override."""
        raise NotImplementedError("subclass BrokerContract and implement make_broker(clock)")

    def make_clock(self) -> Clock:
        return FakeClock()

    def source_name(self) -> str:
        """A fresh destination name per case, so cases never see each other's messages."""
        return f"rs-contract-{uuid.uuid4().hex[:12]}"

    async def prepare_source(self, broker: Broker, source: str) -> None:
        """Create or declare ``source`` before the case uses it (queue, topic, semantics)."""

    async def advance(self, clock: Clock, seconds: float) -> None:
        """Move time by ``seconds``. Default: ``FakeClock.advance`` with loop turns around it;
        subclasses on real servers sleep instead."""
        if isinstance(clock, FakeClock):
            await _turns()
            clock.advance(seconds)
            await _turns()
        else:
            await clock.sleep(seconds)

    async def quiesce(self, clock: Clock) -> None:
        """Let in-flight work settle before asserting that nothing arrived. Default: loop turns
        only (enough for in-process brokers); real servers override with a short real sleep."""
        await _turns()

    def failpoints_of(self, broker: Broker) -> Failpoints:
        fp = getattr(broker, "failpoints", None)
        return fp if isinstance(fp, Failpoints) else FAILPOINTS

    @contextlib.asynccontextmanager
    async def case(self) -> AsyncIterator[BrokerCase]:
        clock = self.make_clock()
        broker = await self.make_broker(clock)
        subs: list[Subscription] = []
        try:
            source = self.source_name()
            await self.prepare_source(broker, source)
            case = BrokerCase(self, clock, broker, source, broker.capabilities(source))
            subs = case.subs
            yield case
        finally:
            for sub in subs:
                await sub.close()
            await broker.close()

    # ------------------------------------------------------------------ cases

    async def test_round_trip_keeps_identity(self) -> None:
        async with self.case() as c:
            sent = Envelope.of(
                f"{c.prefix}:round-trip",
                {"order": "o-91827", "amount": 1999, "note": "naïve ✓", "items": [1, 2]},
                key="customer-7",
                headers={"x-tenant": "acme", "x-trace": "t-1"},
                published_at=c.clock.now(),
            )
            sub = await c.subscribe(c.group())
            await c.publish(sent)
            d = await c.receive(sub)
            got = decode(d)
            assert got.operation_id == sent.operation_id
            assert got.key == sent.key == d.key
            assert got.payload == sent.payload
            assert got.value == sent.value
            assert got.fingerprint == sent.fingerprint
            for k, v in sent.headers.items():
                assert got.headers.get(k) == v, f"user header {k!r} lost or altered"
            assert not RESERVED_HEADERS.intersection(got.headers)
            assert sent.published_at is not None and got.published_at is not None
            assert abs(got.published_at - sent.published_at) < 1e-3
            assert d.attempt == 1
            assert d.redelivered is False
            assert isinstance(d.delivery_id, str) and d.delivery_id
            if c.caps.redelivery is RedeliveryKind.VISIBILITY_TIMEOUT:
                # the runtime extends visibility before this deadline; it must be known
                assert d.settle_deadline is not None and d.settle_deadline > d.received_at
            assert not d.settled
            await d.ack()
            assert d.settled

    async def test_unsettled_delivery_returns_after_crash(self) -> None:
        async with self.case() as c:
            group = c.group()
            a = await c.subscribe(group)
            sent = c.envelope("crash")
            await c.publish(sent)
            first = await c.receive(a)
            await a.close(abandon=True)
            b = await c.subscribe(group)
            if c.caps.redelivery is RedeliveryKind.VISIBILITY_TIMEOUT:
                # a crash does not return the message early: only the timer does
                assert first.settle_deadline is not None
                early = first.settle_deadline - c.clock.now() - self.timer_margin
                await c.expect_nothing(b, advance=max(0.0, early))
                await c.advance(2 * self.timer_margin)
            again = await c.receive(b)
            assert decode(again).operation_id == sent.operation_id
            if c.caps.delivery_count:
                assert again.attempt == 2
                assert again.redelivered is True
            else:
                assert again.attempt >= 1
            await again.ack()

    async def test_nack_redelivers_with_attempt_incremented(self) -> None:
        async with self.case() as c:
            sub = await c.subscribe(c.group())
            sent = c.envelope("nack")
            await c.publish(sent)
            first = await c.receive(sub)
            await first.nack()
            again = await c.receive(sub)
            assert decode(again).operation_id == sent.operation_id
            assert again.redelivered is True
            if c.caps.delivery_count:
                assert again.attempt == first.attempt + 1
            else:
                assert again.attempt >= first.attempt
            await again.ack()

    async def test_delayed_nack_waits(self) -> None:
        async with self.case() as c:
            if not c.caps.delayed_nack:
                pytest.skip("capabilities: delayed_nack=False (nack delay is best effort)")
            sub = await c.subscribe(c.group())
            sent = c.envelope("delayed-nack")
            await c.publish(sent)
            first = await c.receive(sub)
            await first.nack(delay=self.nack_delay)
            await c.expect_nothing(sub, advance=self.nack_delay - self.timer_margin)
            await c.advance(2 * self.timer_margin)
            again = await c.receive(sub)
            assert decode(again).operation_id == sent.operation_id
            assert again.redelivered is True
            await again.ack()

    async def test_ack_prevents_redelivery(self) -> None:
        async with self.case() as c:
            group = c.group()
            a = await c.subscribe(group)
            await c.publish(c.envelope("ack"))
            d = await c.receive(a)
            await d.ack()
            await a.close(abandon=True)
            b = await c.subscribe(group)
            await c.expect_nothing(b, advance=c.past(d))

    async def test_ack_confirmed_holds_through_a_crash(self) -> None:
        """``ack_confirmed()`` returns once the broker holds the completion, so a crash right
        after it never brings the message back: at-most-once runs its effect on that promise.
        A second call has nothing left to confirm and raises."""
        async with self.case() as c:
            group = c.group()
            a = await c.subscribe(group)
            await c.publish(c.envelope("ack-confirmed"))
            d = await c.receive(a)
            await d.ack_confirmed()
            assert d.settled
            with pytest.raises(BrokerError):
                await d.ack_confirmed()
            await a.close(abandon=True)
            b = await c.subscribe(group)
            await c.expect_nothing(b, advance=c.past(d))

    async def test_reject_does_not_redeliver(self) -> None:
        async with self.case() as c:
            group = c.group()
            a = await c.subscribe(group)
            await c.publish(c.envelope("reject"))
            d = await c.receive(a)
            await d.reject("contract: poison")
            assert d.settled
            await c.expect_nothing(a, advance=c.past(d))
            await a.close(abandon=True)
            b = await c.subscribe(group)
            await c.expect_nothing(b, advance=c.past(d))

    async def test_extend_postpones_redelivery(self) -> None:
        async with self.case() as c:
            sub = await c.subscribe(c.group())
            sent = c.envelope("extend")
            await c.publish(sent)
            d = await c.receive(sub)
            if not c.caps.extend_visibility:
                with pytest.raises(CapabilityError):
                    await d.extend(1.0)
                await d.ack()
                return
            assert d.settle_deadline is not None
            remaining = d.settle_deadline - c.clock.now()
            extension = remaining + 3 * self.timer_margin
            await d.extend(extension)
            assert d.settle_deadline >= c.clock.now() + extension - self.timer_margin
            # past the original deadline: still hidden
            await c.expect_nothing(sub, advance=remaining + self.timer_margin)
            await c.advance(c.past(d))
            again = await c.receive(sub)
            assert decode(again).operation_id == sent.operation_id
            assert again.redelivered is True
            await again.ack()

    async def test_order_within_key(self) -> None:
        async with self.case() as c:
            if not c.caps.ordered_within_key:
                pytest.skip("capabilities: ordered_within_key=False")
            sub = await c.subscribe(c.group())
            sent = [c.envelope(f"{k}-{i}", key=f"{c.prefix}-{k}") for i in range(6) for k in "ab"]
            await c.publish(*sent)
            got = await c.receive_many(sub, len(sent))
            for k in "ab":
                key = f"{c.prefix}-{k}"
                want = [e.operation_id for e in sent if e.key == key]
                seen = [decode(d).operation_id for d in got if d.key == key]
                assert seen == want, f"key {key!r} arrived out of order"

    async def test_ambiguous_publish_is_reported_and_retry_keeps_operation_id(self) -> None:
        async with self.case() as c:
            sub = await c.subscribe(c.group())
            sent = c.envelope("ambiguous")
            fp = self.failpoints_of(c.broker)
            before = fp.fired[PUBLISH_AFTER_ACCEPT]
            fp.enable(
                PUBLISH_AFTER_ACCEPT,
                "raise",
                error=PublishAmbiguous("contract: the confirm was lost after the broker accepted"),
                when=lambda ctx: ctx.get("operation_id") == sent.operation_id,
                times=1,
            )
            try:
                with pytest.raises(PublishAmbiguous):
                    await c.publish(sent)
            finally:
                fp.disable(PUBLISH_AFTER_ACCEPT)
            # a fault that never fired proves nothing
            assert fp.fired[PUBLISH_AFTER_ACCEPT] == before + 1
            await c.publish(sent)  # the producer's retry: the SAME envelope
            copies = 1 if c.caps.native_dedup_window else 2
            got = await c.receive_many(sub, copies)
            assert {decode(d).operation_id for d in got} == {sent.operation_id}
            assert {decode(d).fingerprint for d in got} == {sent.fingerprint}
            await c.expect_nothing(sub)

    async def test_settling_twice_is_harmless(self) -> None:
        async with self.case() as c:
            sub = await c.subscribe(c.group())
            await c.publish(c.envelope("twice-1"), c.envelope("twice-2"))
            d1 = await c.receive(sub)
            await d1.ack()
            await d1.ack()
            await d1.nack()  # after the ack: must not requeue
            await d1.reject("late")
            assert d1.settled
            d2 = await c.receive(sub)
            assert decode(d2).operation_id != decode(d1).operation_id
            await d2.nack()
            await d2.nack()  # must not produce a second copy
            d3 = await c.receive(sub)
            assert decode(d3).operation_id == decode(d2).operation_id
            await d3.ack()
            await d3.ack()
            await c.expect_nothing(sub, advance=c.past(d3))

    async def test_competing_consumers_share(self) -> None:
        async with self.case() as c:
            shared = c.group()
            a = await c.subscribe(shared, prefetch=1)
            b = await c.subscribe(shared, prefetch=1)
            sent = [c.envelope(i, key=f"key-{i}") for i in range(12)]
            await c.publish(*sent)
            got: dict[str, list[str]] = {"a": [], "b": []}
            all_in = asyncio.Event()

            async def pump(name: str, sub: Subscription) -> None:
                async for d in sub:
                    got[name].append(decode(d).operation_id)
                    await d.ack()
                    if len(got["a"]) + len(got["b"]) >= len(sent):
                        all_in.set()
                    await asyncio.sleep(0)  # let the other consumer take its turn

            tasks = [asyncio.ensure_future(pump("a", a)), asyncio.ensure_future(pump("b", b))]
            try:
                async with asyncio.timeout(self.receive_timeout):
                    await all_in.wait()
            except TimeoutError:
                pytest.fail(f"the shared group received only {got} of {len(sent)} messages")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.wait(tasks)
            for t in tasks:
                if not t.cancelled() and (exc := t.exception()) is not None:
                    raise exc
            want = sorted(e.operation_id for e in sent)
            # each message to exactly one consumer of the group
            assert sorted(got["a"] + got["b"]) == want
            assert got["a"] and got["b"], f"one consumer got all the work: {got}"

    async def test_groups_each_get_a_copy(self) -> None:
        async with self.case() as c:
            if not c.caps.independent_groups:
                pytest.skip("capabilities: independent_groups=False (one shared queue)")
            first, second = c.group(), c.group()
            a = await c.subscribe(first)
            b = await c.subscribe(second)
            sent = [c.envelope(i, key=f"key-{i}") for i in range(6)]
            await c.publish(*sent)
            want = sorted(e.operation_id for e in sent)
            for sub in (a, b):
                copies = await c.receive_many(sub, len(sent))
                assert sorted(decode(d).operation_id for d in copies) == want
                for d in copies:
                    await d.ack()

    async def test_a_cancelled_receive_loses_nothing(self) -> None:
        """A receive cancelled while it waits (the caller's own timeout, a shutdown) takes
        nothing with it: every message reaches a later receive. Receives here are cut after
        10 ms again and again, so some are cancelled mid-fetch."""
        async with self.case() as c:
            sub = await c.subscribe(c.group(), prefetch=4)
            sent = [c.envelope(i, key=f"key-{i % 3}") for i in range(12)]

            async def trickle() -> None:
                # one at a time, so messages arrive while receives wait and are cut
                for e in sent:
                    await asyncio.sleep(0.03)
                    await c.publish(e)

            publishing = asyncio.ensure_future(trickle())
            got: set[str] = set()
            cancelled = 0
            deadline = time.monotonic() + 2 * self.receive_timeout
            while len(got) < len(sent) and time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(0.01):
                        d = await anext(sub)
                except TimeoutError:
                    cancelled += 1
                    await asyncio.sleep(0)
                    continue
                got.add(decode(d).operation_id)
                await d.ack()
            await publishing
            assert cancelled > 0, "no receive was ever cancelled: the case proves nothing"
            missing = sorted({e.operation_id for e in sent} - got)
            assert not missing, f"lost to cancelled receives: {missing}"

    async def test_close_wakes_a_waiting_consumer(self) -> None:
        async with self.case() as c:
            sub = await c.subscribe(c.group())
            waiting = asyncio.ensure_future(anext(sub))
            await self.quiesce(c.clock)
            assert not waiting.done(), "a consumer with nothing to read must wait"
            await sub.close()
            try:
                async with asyncio.timeout(self.receive_timeout):
                    with pytest.raises(StopAsyncIteration):
                        await waiting
            except TimeoutError:
                pytest.fail("close() did not wake the pending __anext__")
            await sub.close()  # idempotent
            async with asyncio.timeout(self.receive_timeout):
                with pytest.raises(StopAsyncIteration):
                    await anext(sub)


async def _turns(n: int = 20) -> None:
    """Give the event loop ``n`` turns (no real time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)
