"""The Guard (issue 14, items 2-4): the pipeline as a library call, async and sync, batch form,
middleware; and sync handlers on an App, which run through the same sync path."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from replaysafe import (
    App,
    ConfigurationError,
    Context,
    Effect,
    EffectNotApplied,
    Envelope,
    Guarantee,
    QuarantineReason,
    Worker,
)
from replaysafe.brokers import MemoryBroker
from replaysafe.guard import Guard, Message, Outcome, Status
from replaysafe.ledger import MemoryLedger, SQLiteLedger
from replaysafe.ledger.base import OpKey, State

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE


def env(op: str, amount: int = 100) -> Envelope:
    return Envelope.of(op, {"order": op, "amount": amount}).with_published_at(time.time())


def wire(e: Envelope) -> Message:
    """The envelope as a plain client receives it: body bytes and headers."""
    return Message(e.payload, e.wire_headers(), "application/json")


class Sink:
    """Counts effects per operation id, as a downstream would see them."""

    def __init__(self) -> None:
        self.effects: dict[str, int] = {}
        self.threads: set[str] = set()

    def charge(self, ctx: Context) -> dict[str, Any]:
        self.effects[ctx.operation_id] = self.effects.get(ctx.operation_id, 0) + 1
        self.threads.add(threading.current_thread().name)
        return {"charged": ctx.payload["amount"], "key": ctx.idempotency_key}

    async def acharge(self, ctx: Context) -> dict[str, Any]:
        return self.charge(ctx)


async def test_applied_then_duplicate_answered_with_the_stored_result(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    sink = Sink()
    async with Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp")) as g:
        first = await g.run(wire(env("o1")), sink.acharge)
        again = await g.run(wire(env("o1")), sink.acharge)
    await ledger.close()
    assert first == Outcome(Status.APPLIED, "ack", "o1", {"charged": 100, "key": "o1"})
    assert first.ack
    assert again.status is Status.DUPLICATE and again.ack
    assert again.result == {"charged": 100, "key": "o1"}  # from the ledger, fn not run
    assert sink.effects == {"o1": 1}


async def test_every_kind_of_message_input() -> None:
    """Bytes with headers (a plain client), an Envelope, and a bare payload with key=."""
    sink = Sink()
    g = Guard(MemoryLedger(), name="charge", guarantee=EO, effect=Effect.keyed("psp"),
              key=lambda p: p["order"])  # fmt: skip
    e = env("o2")
    outs = [
        await g.run(e, sink.acharge),
        await g.run(wire(e), sink.acharge),
        await g.run({"order": "o2", "amount": 100}, sink.acharge),
        await g.run({"order": "o3", "amount": 5}, sink.acharge),
    ]
    await g.close()
    assert [o.status for o in outs] == [Status.APPLIED, Status.DUPLICATE, Status.DUPLICATE,
                                        Status.APPLIED]  # fmt: skip
    assert sink.effects == {"o2": 1, "o3": 1}
    with pytest.raises(ConfigurationError, match="no key extractor"):
        await Guard(MemoryLedger(), name="x", guarantee=ALO).run({"a": 1}, sink.acharge)


async def test_in_flight_elsewhere_says_retry_after_the_lease() -> None:
    ledger = MemoryLedger()
    g1 = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"), lease=10)
    g2 = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"), lease=10)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(ctx: Context) -> str:
        started.set()
        await release.wait()
        return "ok"

    first = asyncio.create_task(g1.run(wire(env("o1")), slow))
    await started.wait()
    second = await g2.run(wire(env("o1")), slow)
    release.set()
    assert (await first).status is Status.APPLIED
    assert second.status is Status.IN_FLIGHT and second.action == "nack"
    assert second.retry_after is not None and 9 < second.retry_after <= 10.1
    await g1.close()
    await g2.close()


async def test_key_reuse_and_bad_input_are_quarantined_and_acked() -> None:
    ledger = MemoryLedger()
    sink = Sink()
    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"))
    await g.run(wire(env("o1", 100)), sink.acharge)
    reused = await g.run(wire(env("o1", 999)), sink.acharge)
    bad = await g.run(Message(b"{not json", {"rs-operation-id": "o9"}), sink.acharge)
    await g.close()
    assert reused.status is Status.QUARANTINED and reused.ack
    assert reused.reason is QuarantineReason.KEY_REUSE_CONFLICT and reused.entry_id
    assert bad.status is Status.QUARANTINED and bad.ack and bad.operation_id is None
    assert bad.reason is QuarantineReason.MALFORMED_PAYLOAD
    assert sink.effects == {"o1": 1}
    entries = await ledger.quarantined()
    assert {e.id for e in entries} == {reused.entry_id, bad.entry_id}


async def test_a_failure_is_retried_then_quarantined_by_the_budget() -> None:
    from replaysafe import RetryPolicy

    ledger = MemoryLedger()
    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"),
              retry=RetryPolicy(max_attempts=2, base_delay=0.5))  # fmt: skip

    async def boom(ctx: Context) -> None:
        raise RuntimeError("psp said 503")

    first = await g.run(wire(env("o1")), boom)
    second = await g.run(wire(env("o1")), boom)
    await g.close()
    assert first.status is Status.RETRY and first.action == "nack"
    assert first.retry_after is not None and 0 <= first.retry_after <= 0.5
    assert second.status is Status.QUARANTINED and second.reason is QuarantineReason.MAX_ATTEMPTS
    rec = await ledger.get(OpKey("charge", "o1"))
    assert rec is not None and rec.state is State.QUARANTINED


async def test_at_most_once_needs_the_ack_and_runs_after_it() -> None:
    order: list[str] = []

    async def ack() -> None:
        order.append("ack")

    async def fn(ctx: Context) -> None:
        order.append("effect")

    g = Guard(MemoryLedger(), name="notify", guarantee=AMO)
    with pytest.raises(ConfigurationError, match="ack="):
        await g.run(wire(env("o1")), fn)
    out = await g.run(wire(env("o1")), fn, ack=ack)
    assert out.status is Status.APPLIED and out.action == "none" and order == ["ack", "effect"]

    async def broken_ack() -> None:
        raise OSError("channel closed")

    out = await g.run(wire(env("o2")), fn, ack=broken_ack)
    assert out.status is Status.UNCONFIRMED and order == ["ack", "effect"]
    await g.close()


async def test_batch_claims_and_completes_in_one_round_trip_each() -> None:
    ledger = MemoryLedger()
    calls = {"claim_many": 0, "complete_many": 0, "claim": 0}
    for name in calls:
        real = getattr(ledger, name)

        def counted(*a: Any, _real: Any = real, _name: str = name) -> Awaitable[Any]:
            calls[_name] += 1
            return _real(*a)  # type: ignore[no-any-return]

        setattr(ledger, name, counted)
    sink = Sink()
    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"))
    outs = await g.run_batch([wire(env(f"o{i}")) for i in range(10)], sink.acharge)
    await g.close()
    assert [o.status for o in outs] == [Status.APPLIED] * 10
    assert [o.operation_id for o in outs] == [f"o{i}" for i in range(10)]
    assert calls == {"claim_many": 1, "complete_many": 1, "claim": 0}


def test_sync_run_calls_fn_in_the_calling_thread(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    sink = Sink()
    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"))
    try:
        outs = [g.run_sync(wire(env("o1")), sink.charge) for _ in range(2)]
        batch = g.run_batch_sync([wire(env(f"b{i}")) for i in range(5)], sink.charge)
    finally:
        g.close_sync()
    assert [o.status for o in outs] == [Status.APPLIED, Status.DUPLICATE]
    assert outs[1].result == {"charged": 100, "key": "o1"}
    assert [o.status for o in batch] == [Status.APPLIED] * 5
    assert sink.threads == {threading.current_thread().name}
    assert sink.effects == {"o1": 1, **{f"b{i}": 1 for i in range(5)}}


def test_sync_run_from_a_thread_pool() -> None:
    from concurrent.futures import ThreadPoolExecutor

    sink = Sink()
    lock = threading.Lock()

    def charge(ctx: Context) -> Any:
        with lock:
            return sink.charge(ctx)

    g = Guard(MemoryLedger(), name="charge", guarantee=EO, effect=Effect.keyed("psp"))
    msgs = [wire(env(f"o{i % 20}")) for i in range(60)]  # every operation three times
    try:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda m: g.run_sync(m, charge), msgs))
    finally:
        g.close_sync()
    assert sink.effects == {f"o{i}": 1 for i in range(20)}
    assert sum(o.status is Status.APPLIED for o in outs) == 20
    assert all(o.status in (Status.DUPLICATE, Status.IN_FLIGHT) for o in outs if
               o.status is not Status.APPLIED)  # fmt: skip


def test_a_sync_cut_of_an_unkeyed_effect_is_quarantined_outcome_unknown() -> None:
    """The deadline cannot stop a thread: the run is decided as cut (an unknown outcome for an
    unkeyed effect) and run_sync returns once fn has returned."""
    ledger = MemoryLedger()
    g = Guard(ledger, name="mail", guarantee=EO, effect=Effect.unkeyed("smtp"), lease=0.3,
              timeout=0.2)  # fmt: skip
    ran: list[str] = []

    def slow(ctx: Context) -> None:
        time.sleep(0.6)
        ran.append(ctx.operation_id)

    try:
        out = g.run_sync(wire(env("o1")), slow)
    finally:
        g.close_sync()
    assert ran == ["o1"]
    assert out.status is Status.QUARANTINED and out.reason is QuarantineReason.OUTCOME_UNKNOWN


def test_the_lease_is_extended_while_a_sync_fn_runs() -> None:
    ledger = MemoryLedger()
    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"), lease=0.3)
    seen: list[Outcome] = []

    def slow(ctx: Context) -> str:
        time.sleep(0.5)  # past the first lease: only the extension keeps the claim ours
        # a second copy arriving now (from this thread: the guard's loop is free meanwhile)
        seen.append(g.run_sync(wire(env("o1")), lambda c: "second"))
        time.sleep(0.3)
        return "first"

    try:
        out = g.run_sync(wire(env("o1")), slow)
    finally:
        g.close_sync()
    assert out.status is Status.APPLIED and out.result == "first"
    assert seen[0].status is Status.IN_FLIGHT
    assert g.stats.total("replaysafe_lease_extensions_total", handler="charge") >= 1


def test_once_decorator_passes_the_payload_and_ctx() -> None:
    g = Guard(MemoryLedger(), name="charge", guarantee=EO, effect=Effect.keyed("psp"),
              key=lambda p: p["order"])  # fmt: skip
    keys: list[str | None] = []

    @g.once
    def charge(payload: dict[str, Any], ctx: Context) -> int:
        keys.append(ctx.idempotency_key)
        return int(payload["amount"])

    try:
        out = charge({"order": "o1", "amount": 7})
        dup = charge({"order": "o1", "amount": 7})
    finally:
        g.close_sync()
    assert (out.status, out.result, dup.status, dup.result) == (
        Status.APPLIED, 7, Status.DUPLICATE, 7
    )  # fmt: skip
    assert keys == ["o1"]


async def test_once_decorator_on_an_async_function() -> None:
    g = Guard(MemoryLedger(), name="charge", guarantee=ALO, key=lambda p: p["order"])

    @g.once
    async def charge(payload: dict[str, Any]) -> int:
        return int(payload["amount"])

    out = await charge({"order": "o1", "amount": 3})
    await g.close()
    assert out.status is Status.APPLIED and out.result == 3


async def test_middleware_wraps_inside_the_claim_and_cannot_skip_it() -> None:
    ledger = MemoryLedger()
    trail: list[str] = []

    def mw(label: str) -> Callable[[Any], Any]:
        def wrap(fn: Callable[[Context], Awaitable[Any]]) -> Callable[[Context], Awaitable[Any]]:
            async def call(ctx: Context) -> Any:
                rec = await ledger.get(OpKey("charge", ctx.operation_id))
                trail.append(f"{label}:{rec.state.value if rec else None}")
                return await fn(ctx)

            return call

        return wrap

    async def fn(ctx: Context) -> str:
        trail.append("fn")
        return "done"

    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"),
              middleware=[mw("outer"), mw("inner")])  # fmt: skip
    await g.run(wire(env("o1")), fn)
    await g.run(wire(env("o1")), fn)  # a duplicate: no middleware runs, nothing to wrap
    await g.close()
    assert trail == ["outer:in_flight", "inner:in_flight", "fn"]


async def test_an_unkeyed_failure_that_proves_nothing_happened_is_retried() -> None:
    g = Guard(MemoryLedger(), name="mail", guarantee=EO,
              effect=Effect.unkeyed("smtp", not_applied_on=(ConnectionRefusedError,)))  # fmt: skip

    async def refused(ctx: Context) -> None:
        raise ConnectionRefusedError("smtp down")

    async def unknown(ctx: Context) -> None:
        raise TimeoutError("sent, no answer")

    async def proven(ctx: Context) -> None:
        raise EffectNotApplied("validated before sending")

    outs = [await g.run(wire(env(op)), fn) for op, fn in
            (("a", refused), ("b", unknown), ("c", proven))]  # fmt: skip
    await g.close()
    assert [o.status for o in outs] == [Status.RETRY, Status.QUARANTINED, Status.RETRY]
    assert outs[1].reason is QuarantineReason.OUTCOME_UNKNOWN


async def test_a_sync_handler_on_an_app_runs_on_a_worker_thread(tmp_path: Path) -> None:
    from tests.runtime_harness import order

    broker, ledger = MemoryBroker(), SQLiteLedger(tmp_path / "l.db")
    app = App("shop", broker=broker, ledger=ledger)
    sink = Sink()
    app.handler("orders", guarantee=EO, effect=Effect.keyed("psp"), concurrency=4)(sink.charge)
    await broker.publish("orders", [order(i) for i in range(20)] + [order(3), order(7)])
    w = Worker(app)
    run = asyncio.create_task(w.run())
    from tests.waits import until

    await until(lambda: len(sink.effects) == 20 and w.in_flight == 0, seconds=20, what="20 effects")
    w.stop()
    await run
    await ledger.close()
    assert set(sink.effects.values()) == {1}
    assert all(t.startswith("replaysafe-handler") for t in sink.threads)


async def test_a_sync_handler_cut_at_its_deadline_is_quarantined_outcome_unknown() -> None:
    """A sync handler cannot be cancelled: the worker stops waiting at the deadline and decides
    as for an async cut (unkeyed: outcome_unknown), while the thread finishes on its own."""
    from tests.runtime_harness import order
    from tests.waits import until

    broker, ledger = MemoryBroker(), MemoryLedger()
    app = App("shop", broker=broker, ledger=ledger)
    finished: list[str] = []

    def mail(ctx: Context) -> None:
        time.sleep(0.8)
        finished.append(ctx.operation_id)

    app.handler("orders", guarantee=EO, effect=Effect.unkeyed("smtp"), lease=1.0, timeout=0.3)(mail)
    await broker.publish("orders", [order(1)])
    w = Worker(app)
    run = asyncio.create_task(w.run())
    entries = await until(ledger.quarantined, seconds=10, what="a quarantine entry")
    await until(lambda: finished, seconds=10, what="the thread to finish")
    w.stop()
    await run
    assert [e.reason for e in entries] == [QuarantineReason.OUTCOME_UNKNOWN]
    assert w.stats.total("replaysafe_deliveries_total", handler="mail", outcome="quarantined") == 1


def test_a_sync_batch_claims_and_completes_in_one_twin_call_each() -> None:
    """run_batch_sync: the batch's completions park until every message reached them, then go
    out in one complete_many on the sync twin (and its claims in one claim_many)."""
    ledger = MemoryLedger()
    twin = ledger.sync()
    calls = {"claim_many": 0, "complete_many": 0, "claim": 0, "complete": 0}
    for name in calls:
        real = getattr(twin, name)

        def counted(*a: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return _real(*a)

        setattr(twin, name, counted)
    ledger.sync = lambda: twin  # type: ignore[method-assign]
    sink = Sink()
    g = Guard(ledger, name="charge", guarantee=EO, effect=Effect.keyed("psp"))
    try:
        outs = g.run_batch_sync([wire(env(f"o{i}")) for i in range(10)], sink.charge)
    finally:
        g.close_sync()
    assert [o.status for o in outs] == [Status.APPLIED] * 10
    assert calls == {"claim_many": 1, "complete_many": 1, "claim": 0, "complete": 0}


def test_sync_at_most_once_acks_first_and_bad_input_is_quarantined() -> None:
    order: list[str] = []
    g = Guard(MemoryLedger(), name="notify", guarantee=AMO)
    try:
        with pytest.raises(ConfigurationError, match="ack="):
            g.run_sync(wire(env("o1")), lambda ctx: order.append("effect"))
        out = g.run_sync(wire(env("o1")), lambda ctx: order.append("effect"),
                         ack=lambda: order.append("ack"))  # fmt: skip
        bad = g.run_sync(Message(b"\xff\xfe", {"rs-operation-id": "o2"}), lambda ctx: None,
                         ack=lambda: None)  # fmt: skip
    finally:
        g.close_sync()
    assert out.status is Status.APPLIED and out.action == "none" and order == ["ack", "effect"]
    assert bad.status is Status.QUARANTINED and bad.ack


def test_an_async_middleware_that_awaits_io_fails_the_attempt_on_the_sync_path() -> None:
    """There is no event loop on the sync path: a middleware awaiting asyncio I/O fails (its
    RuntimeError is the attempt's failure, retried by policy) and the function never runs."""

    def sleepy(fn: Callable[[Context], Awaitable[Any]]) -> Callable[[Context], Awaitable[Any]]:
        async def call(ctx: Context) -> Any:
            await asyncio.sleep(0.01)  # real asyncio I/O: there is no loop on the sync path
            return await fn(ctx)

        return call

    ran: list[str] = []
    g = Guard(MemoryLedger(), name="charge", guarantee=ALO, middleware=[sleepy])
    try:
        out = g.run_sync(wire(env("o1")), lambda ctx: ran.append("effect"))
    finally:
        g.close_sync()
    assert out.status is Status.RETRY and out.action == "nack"
    assert ran == []


def test_a_sync_transactional_effect_commits_with_the_ledger_row(tmp_path: Path) -> None:
    """A plain function writes its business row through ctx.tx (the SQLite twin's sync
    transaction): the row and the completion commit together; a failure rolls both back."""
    import sqlite3

    from replaysafe import RetryPolicy

    path = tmp_path / "l.db"
    ledger = SQLiteLedger(path)
    g = Guard(ledger, name="book", guarantee=EO, effect=Effect.transactional(),
              retry=RetryPolicy(max_attempts=3, base_delay=0))  # fmt: skip
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE orders (op TEXT PRIMARY KEY, amount INT)")
    con.commit()

    def book(ctx: Context) -> str:
        ctx.tx.execute(
            "INSERT INTO orders VALUES (?, ?)", (ctx.operation_id, ctx.payload["amount"])
        )
        if ctx.payload["amount"] < 0:
            raise ValueError("refused after the insert")
        return "booked"

    try:
        ok = g.run_sync(wire(env("o1", 5)), book)
        dup = g.run_sync(wire(env("o1", 5)), book)
        bad = g.run_sync(wire(env("o2", -1)), book)
    finally:
        g.close_sync()
    rows = con.execute("SELECT op, amount FROM orders").fetchall()
    con.close()
    assert (ok.status, dup.status, dup.result) == (Status.APPLIED, Status.DUPLICATE, "booked")
    assert bad.status is Status.RETRY  # rolled back, released: retried
    assert rows == [("o1", 5)]
