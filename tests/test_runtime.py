"""The fixed pipelines of DESIGN §2, on the memory broker and a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from replaysafe import (
    ConfigurationError,
    Context,
    Effect,
    Envelope,
    Guarantee,
    LedgerUnavailable,
    QuarantineReason,
    RetryPolicy,
)
from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.ledger import MemoryLedger, OpKey, State
from replaysafe.quarantine import EffectRisk

from .runtime_harness import Harness, once_for

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.1, max_delay=0.5)


def order(i: int, amount: int = 100) -> Envelope:
    return Envelope.of(f"charge:order-{i}", {"order": f"order-{i}", "amount": amount})


def charging(h: Harness, **kwargs: Any) -> None:
    """Register the standard charging handler on ``h``."""

    async def charge(ctx: Context) -> str:
        return await h.probe.apply(ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key)

    h.app.handler("orders", **kwargs)(charge)


async def test_effectively_once_applies_each_operation_once() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    await h.publish(*(order(i) for i in range(20)))
    h.start(workers=2)
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(20)}
    rec = await h.ledger.get(OpKey("charge", "charge:order-3"))
    assert rec is not None and rec.state is State.COMPLETED and rec.result is not None


async def test_duplicate_transport_copies_are_answered_from_the_ledger() -> None:
    h = Harness(honour_keys=False)  # the downstream cannot dedupe: only the ledger can
    charging(h, guarantee=EO, effect=Effect.unkeyed("payments"), lease=5, concurrency=1)
    await h.publish(order(1), order(1), order(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    assert h.total(o.DUPLICATE_HITS, cause="completed") == 1


async def test_crash_after_effect_is_recovered_with_the_same_idempotency_key() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1), order(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.failpoints.fired[fp.AFTER_EFFECT_BEFORE_LEDGER] == 1
    assert h.crashes == 1
    # redelivered while the dead worker's lease was live: not run, nacked past the lease
    assert h.total(o.OVERLAPS_PREVENTED) >= 1
    # re-run after expiry with the same key: the downstream answered from its key, no new charge
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    assert h.probe.replays_answered == 1
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 2


async def test_unkeyed_effect_with_unknown_outcome_is_quarantined_not_rerun() -> None:
    h = Harness(honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"), lease=5)
    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1}
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.OUTCOME_UNKNOWN
    assert entry.risk is EffectRisk.OUTCOME_UNKNOWN
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.QUARANTINED


async def test_unkeyed_effect_opting_into_retry_duplicates_honestly() -> None:
    h = Harness(honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.unkeyed("smtp", on_unknown="retry"), lease=5)
    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 2}  # at-least-once at smtp, as declared


async def test_key_reuse_conflict_is_quarantined_and_never_applied() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    await h.publish(order(1, amount=100))
    h.start()
    await h.drain()
    await h.publish(order(1, amount=999))  # same operation id, different payload
    await h.drain()
    await h.stop()
    assert h.probe.effects == [("fx_1", "order-1", 100)]
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.KEY_REUSE_CONFLICT
    assert entry.risk is EffectRisk.NEVER_CLAIMED
    assert entry.message is not None and b"999" in entry.message


async def test_handler_errors_are_released_and_retried_with_backoff() -> None:
    h = Harness()
    calls = 0

    async def flaky(ctx: Context) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("downstream 503")
        await h.probe.apply("order-1", None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=FAST_RETRY)(flaky)
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    assert calls == 3 and h.probe.per_subject() == {"order-1": 1}
    assert h.total(o.RETRIES) == 2
    rec = await h.ledger.get(OpKey("flaky", "charge:order-1"))
    assert rec is not None and rec.attempts == 3 and rec.state is State.COMPLETED


async def test_non_retryable_error_is_quarantined_on_first_attempt() -> None:
    h = Harness()

    async def strict(ctx: Context) -> None:
        raise KeyError("no such customer")

    retry = RetryPolicy(max_attempts=5, give_up_on=(KeyError,))
    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=retry)(strict)
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.NON_RETRYABLE_ERROR and entry.attempts == 1


async def test_retry_budget_exhausted_goes_to_quarantine() -> None:
    h = Harness()

    async def broken(ctx: Context) -> None:
        raise RuntimeError("always")

    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=FAST_RETRY)(broken)
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MAX_ATTEMPTS and entry.attempts == 4
    assert entry.risk is EffectRisk.RELEASED_CLEANLY


async def test_poison_that_kills_the_worker_every_time_is_still_quarantined() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=2, retry=FAST_RETRY)
    h.failpoints.enable(
        fp.BEFORE_EFFECT, "kill", when=lambda ctx: ctx["operation_id"] == "charge:order-1"
    )
    await h.publish(order(1), order(2))
    h.start()
    await h.drain()
    await h.stop()
    # attempts 1..4 each killed the worker; the 5th claim finds the budget spent
    assert h.crashes == 4
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MAX_ATTEMPTS
    assert entry.risk is EffectRisk.OUTCOME_UNKNOWN
    assert h.probe.per_subject() == {"order-2": 1}


async def test_at_most_once_completes_first_and_may_lose() -> None:
    h = Harness()
    charging(h, guarantee=AMO)
    h.failpoints.enable(fp.BEFORE_EFFECT, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1), order(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-2": 1}  # order-1 lost: completed, then crashed


async def test_at_most_once_never_retries_a_failed_handler() -> None:
    h = Harness()
    calls = 0

    async def failing(ctx: Context) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    h.handler(AMO)(failing)
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.run_until(lambda: calls >= 1)
    await h.clock.run_for(5)
    await h.stop()
    assert calls == 1


async def test_at_least_once_duplicates_after_a_crash_after_effect() -> None:
    h = Harness(honour_keys=False)
    charging(h, guarantee=ALO)
    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1), order(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 2, "order-2": 1}


async def test_bad_input_is_quarantined_and_the_good_messages_applied() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    await h.publish(order(1))
    await h.publish_raw(b'{"order": "x", "amount": 1}', {})  # no operation id, no key extractor
    await h.publish_raw(b"[NaN]", {"rs-operation-id": "charge:nan"})
    await h.publish_raw(
        b"\x80\x04pickle",
        {"rs-operation-id": "charge:p", "content-type": "application/x-python-pickle"},
    )
    await h.publish(order(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    reasons = sorted(e.reason.value for e in await h.ledger.quarantined())
    assert reasons == ["invalid_operation_id", "malformed_payload", "unsupported_content_type"]
    assert h.crashes == 0


async def test_key_extractor_derives_the_operation_id_for_plain_clients() -> None:
    h = Harness()
    charging(
        h,
        guarantee=EO,
        effect=Effect.keyed("payments"),
        lease=5,
        key=lambda p: ("charge", p["order"]),
    )
    await h.publish_raw(b'{"order": "order-7", "amount": 5}', {})
    await h.publish_raw(b'{"amount": 5, "order": "order-7"}', {})  # same payload, other spelling
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-7": 1}
    assert await h.ledger.get(OpKey("charge", "charge:order-7")) is not None


def _jobs(h: Harness) -> None:
    async def job(ctx: Context) -> str:
        return await h.probe.apply(str(ctx.payload["id"]), None, ctx.idempotency_key)

    h.app.handler("orders", guarantee=EO, effect=Effect.keyed("jobs"), lease=5,
                  key=lambda p: ("job", p["id"]))(job)  # fmt: skip


@pytest.mark.parametrize(
    ("header", "body", "then", "applied", "never"),
    [
        # a header naming ANOTHER message's operation: applied as job:45 before, and the real
        # message 45 was then refused as a key-reuse conflict and never applied
        ("job:45", b'{"id": 9016}', b'{"id": 45}', {"45": 1}, "job:9016"),
        # a header in another namespace: applied as custom:9017, then the plain copy applied
        # 9017 a second time under job:9017
        ("custom:9017", b'{"id": 9017}', b'{"id": 9017}', {"9017": 1}, "custom:9017"),
    ],
    ids=["other-operation", "other-namespace"],
)
async def test_an_operation_id_header_that_disagrees_with_the_key_extractor_is_quarantined(
    header: str, body: bytes, then: bytes, applied: dict[str, int], never: str
) -> None:
    # issue 13 item 15: where a handler declares a key extractor, the extractor decides; a
    # disagreeing rs-operation-id header is quarantined before any effect, never applied
    h = Harness()
    _jobs(h)
    await h.publish_raw(body, {"rs-operation-id": header})
    await h.publish_raw(then, {})
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == applied  # each real operation once, the mismatch never
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.OPERATION_ID_MISMATCH
    assert header in entry.first_detail and entry.attempts == 1
    assert await h.ledger.get(OpKey("job", never)) is None  # decided before any claim
    assert h.total("replaysafe_quarantined_total", reason="key_reuse_conflict") == 0


async def test_an_operation_id_header_that_agrees_with_the_key_extractor_is_applied() -> None:
    h = Harness()
    _jobs(h)
    await h.publish_raw(b'{"id": 42}', {"rs-operation-id": "job:42"})
    await h.publish_raw(b'{"id": 42}', {})  # the same operation from a plain client
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"42": 1}
    assert await h.ledger.quarantined() == []
    assert h.total("replaysafe_duplicate_hits_total", cause="completed") == 1


async def test_delivery_beyond_the_replay_horizon_is_refused() -> None:
    h = Harness(horizon=3600)
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    old = order(1).with_published_at(h.clock.now() - 7200)
    await h.broker.publish("orders", [old])
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.effects == []
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.BEYOND_HORIZON


async def test_lease_is_extended_while_a_long_handler_runs() -> None:
    h = Harness(mode=RedeliveryKind.VISIBILITY_TIMEOUT)

    async def slow(ctx: Context) -> None:
        await h.clock.sleep(12)  # four leases long; the visibility timeout is 10 s
        await h.probe.apply("order-1", None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=3, timeout=60)(slow)
    await h.publish(order(1))
    h.start(workers=2)
    await h.drain(seconds=60)
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1}
    assert h.total(o.LEASE_EXTENSIONS) >= 3
    assert h.total(o.VISIBILITY_EXTENSIONS) >= 3
    assert h.total(o.OVERLAPS_PREVENTED) == 0  # visibility never lapsed, nobody else saw it


async def test_deadline_cuts_a_hung_handler_and_the_operation_is_retried() -> None:
    h = Harness()
    calls = 0

    async def hangs_once(ctx: Context) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # never returns
        await h.probe.apply("order-1", None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=FAST_RETRY)(hangs_once)
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    assert calls == 2 and h.probe.per_subject() == {"order-1": 1}


async def test_a_keyed_handler_cut_at_every_deadline_is_quarantined_outcome_unknown() -> None:
    """A keyed effect is retried after a cut (the key makes the re-run safe), but the cut
    cancelled the handler wherever it was, maybe after its request left: when the budget runs
    out, the quarantine must say the effect may have happened, not that it was released
    cleanly."""
    h = Harness()

    async def always_hangs(ctx: Context) -> None:
        await asyncio.Event().wait()

    h.handler(EO, effect=Effect.keyed("payments"), lease=5, timeout=2, retry=FAST_RETRY)(
        always_hangs
    )
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MAX_ATTEMPTS and entry.attempts == 4
    assert entry.risk is EffectRisk.OUTCOME_UNKNOWN


async def test_zombie_whose_lease_was_taken_over_is_fenced() -> None:
    h = Harness()
    gate = asyncio.Event()
    entered = asyncio.Event()
    key = OpKey("stall", "charge:order-1")

    async def stall(ctx: Context) -> None:
        entered.set()
        await gate.wait()
        await h.probe.apply("order-1", None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=3, timeout=100)(stall)
    await h.publish(order(1))
    h.start()
    await h.run_until(entered.is_set)
    rec = await h.ledger.get(key)
    assert rec is not None and rec.state is State.IN_FLIGHT
    # the process stalls (e.g. SIGSTOP) past its lease: time jumps, and before its heartbeat can
    # run another worker takes the operation over
    h.clock.advance(10)
    thief = await h.ledger.claim(key, rec.fingerprint, "thief", 30)
    assert thief.__class__.__name__ == "Acquired"
    for _ in range(20):
        await asyncio.sleep(0)
    gate.set()
    await h.run_until(lambda: h.total(o.LEASE_LOST) >= 1, seconds=5)
    await h.stop()
    assert h.probe.effects == []  # the zombie was cut before its effect
    rec = await h.ledger.get(key)
    assert rec is not None and rec.owner == "thief"


async def test_graceful_stop_drains_in_flight_work() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    await h.publish(*(order(i) for i in range(5)))
    h.start()
    await h.drain()
    await h.stop()
    assert sum(h.probe.per_subject().values()) == 5
    assert all(w.stats.total(o.LEASE_LOST) == 0 for w in h.workers)


def test_guarantee_is_required_and_validated() -> None:
    h = Harness()
    with pytest.raises(TypeError):
        h.app.handler("orders")  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="one of"):
        h.app.handler("orders", guarantee="exactly-once")
    with pytest.raises(ConfigurationError, match="must declare its effect"):
        h.app.handler("orders", guarantee=EO)
    with pytest.raises(ConfigurationError, match="not transactional"):
        h.app.handler("orders", guarantee=EO, effect=Effect.transactional())
    assert isinstance(h.ledger, MemoryLedger)


async def test_crash_after_ledger_before_ack_is_answered_as_a_duplicate() -> None:
    h = Harness(honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.unkeyed("payments"), lease=5)
    h.failpoints.enable(fp.AFTER_LEDGER_BEFORE_ACK, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    assert h.failpoints.fired[fp.AFTER_LEDGER_BEFORE_ACK] == 1
    assert h.probe.per_subject() == {"order-1": 1}
    assert h.total(o.DUPLICATE_HITS, cause="completed") == 1
    assert await h.ledger.quarantined() == []


async def test_crash_between_quarantine_and_ack_keeps_one_entry() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    h.failpoints.enable(fp.AFTER_QUARANTINE_BEFORE_ACK, "kill", times=1)
    await h.publish_raw(b"{not json", {"rs-operation-id": "charge:bad"})
    h.start()
    await h.drain()
    await h.stop()
    assert h.crashes == 1
    [entry] = await h.ledger.quarantined()  # recorded before the crash, idempotent after it
    assert entry.reason is QuarantineReason.MALFORMED_PAYLOAD and entry.seen == 2


async def test_transactional_effect_commits_with_the_ledger_row(tmp_path: Any) -> None:
    from replaysafe.ledger.sqlite import SQLiteLedger
    from replaysafe.testing import FakeClock

    clock = FakeClock()
    ledger = SQLiteLedger(tmp_path / "l.db", clock=clock)
    h = Harness(ledger=ledger, clock=clock)
    async with ledger.transaction() as tx:
        await tx.execute("CREATE TABLE charges (order_id TEXT, amount INTEGER)")

    async def book(ctx: Context) -> None:
        assert ctx.tx is not None
        await ctx.tx.execute(
            "INSERT INTO charges VALUES (?, ?)", (ctx.payload["order"], ctx.payload["amount"])
        )

    h.handler(EO, effect=Effect.transactional(), lease=5)(book)
    # killed after the insert but before the ledger row: the transaction never commits
    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-1"))
    await h.publish(order(1), order(2), order(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.crashes == 1
    async with ledger.transaction() as tx:
        rows = await tx.fetchall("SELECT order_id, COUNT(*) FROM charges GROUP BY order_id")
    assert sorted(rows) == [("order-1", 1), ("order-2", 1)]
    await ledger.close()


class FlakyLedger(MemoryLedger):
    """A memory ledger whose named methods fail as if the database were unreachable."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.down: set[str] = set()
        self.refused = 0

    def _check(self, name: str) -> None:
        if name in self.down:
            self.refused += 1
            raise LedgerUnavailable(f"{name}: connection refused (test)")

    async def claim(self, *a: Any, **k: Any) -> Any:
        self._check("claim")
        return await super().claim(*a, **k)

    async def claim_many(self, *a: Any, **k: Any) -> Any:
        self._check("claim")
        return await super().claim_many(*a, **k)

    async def complete_many(self, *a: Any, **k: Any) -> Any:
        self._check("complete")
        return await super().complete_many(*a, **k)

    async def get(self, *a: Any, **k: Any) -> Any:
        self._check("get")
        return await super().get(*a, **k)


async def test_consumption_pauses_while_the_ledger_is_down_and_resumes() -> None:
    from replaysafe.testing import FakeClock

    clock = FakeClock()
    ledger = FlakyLedger(clock)
    ledger.down = {"claim", "get"}
    h = Harness(ledger=ledger, clock=clock)
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    await h.publish(*(order(i) for i in range(3)))
    h.start()
    await h.run_until(lambda: h.total(o.LEDGER_UNAVAILABLE) >= 1)

    def fetched() -> int:
        return sum(h.broker.delivery_count("orders", h.group(), f"charge:order-{i}")
                   for i in range(3))  # fmt: skip

    await h.clock.run_for(5, step=0.5)
    before = fetched()
    await h.clock.run_for(30, step=0.5)
    assert h.probe.effects == []  # no effect without a confirmed claim
    assert fetched() == before  # paused: nothing is fetched (or churned) while the ledger is down
    assert ledger.refused >= 3  # ...but the ledger is probed with backoff
    ledger.down = set()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(3)}


async def test_ledger_down_after_the_effect_never_acks_and_never_duplicates() -> None:
    from replaysafe.testing import FakeClock

    clock = FakeClock()
    ledger = FlakyLedger(clock)
    h = Harness(ledger=ledger, clock=clock)
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    ledger.down = {"complete", "get"}
    await h.publish(order(1))
    h.start()
    await h.run_until(lambda: h.total(o.LEDGER_UNAVAILABLE) >= 1, seconds=30)
    assert h.depth() == 1  # the effect happened, but nothing completed it at the broker
    ledger.down = set()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1}  # the keyed re-run was answered by key
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED


async def test_future_publish_time_beyond_skew_is_quarantined() -> None:
    h = Harness()
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    ahead = order(1).with_published_at(h.clock.now() + 3600)
    near = order(2).with_published_at(h.clock.now() + 60)  # within the 300 s allowance
    await h.broker.publish("orders", [ahead, near])
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-2": 1}
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.FUTURE_TIMESTAMP


async def test_visibility_shorter_than_the_heartbeat_is_extended_in_time() -> None:
    # lease 30 s → heartbeat every 10 s, but the broker's visibility is only 4 s: the first
    # extension must come before the visibility ends, or another worker would see the message
    h = Harness(mode=RedeliveryKind.VISIBILITY_TIMEOUT)
    h.broker.declare("short", mode=RedeliveryKind.VISIBILITY_TIMEOUT, visibility_timeout=4.0)

    async def slow(ctx: Context) -> None:
        await h.clock.sleep(15)
        await h.probe.apply("order-1", None, ctx.idempotency_key)

    h.app.handler("short", guarantee=EO, effect=Effect.keyed("payments"), lease=30)(slow)
    await h.broker.publish("short", [order(1).with_published_at(h.clock.now())])
    h.start(workers=2)
    await h.run_until(lambda: h.probe.calls >= 1, seconds=60, step=0.1)
    await h.clock.run_for(2, step=0.1)
    await h.stop()
    assert h.probe.calls == 1
    assert h.total(o.OVERLAPS_PREVENTED) == 0  # nobody else was handed the message
    assert h.broker.delivery_count("short", h.group(), "charge:order-1") == 1


async def test_retry_budget_by_elapsed_time_since_first_publish() -> None:
    h = Harness()

    async def broken(ctx: Context) -> None:
        raise RuntimeError("still down")

    retry = RetryPolicy(max_attempts=100, base_delay=5, max_delay=5, max_elapsed=30)
    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=retry)(broken)
    await h.publish(order(1))
    h.start()
    await h.drain(seconds=300)
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MAX_ATTEMPTS
    assert 1 < entry.attempts < 100  # stopped by time, long before the attempt budget
    assert "since the first publish" in entry.last_detail


async def test_a_worker_stalled_past_its_lease_never_starts_the_effect() -> None:
    """A stall between the claim and the handler (GC, SIGSTOP) outlives the lease; the broker
    redelivers and another worker takes the operation over. When the stalled worker resumes it
    must not start the effect on its dead lease: the downstream here cannot dedupe, so a start
    would be a second charge."""
    h = Harness(mode=RedeliveryKind.VISIBILITY_TIMEOUT, honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.keyed("payments"), lease=5)
    h.failpoints.enable(fp.BEFORE_EFFECT, "sleep", seconds=30, when=once_for("charge:order-1"))
    await h.publish(order(1), order(2))
    h.start(workers=2)
    await h.drain()
    await h.run_until(lambda: h.total(o.LEASE_LOST) >= 1, seconds=60)
    await h.stop()
    assert h.failpoints.fired[fp.BEFORE_EFFECT] == 1
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 2


async def test_a_stall_past_the_lease_before_a_transactional_effect_extends_and_applies(
    tmp_path: Path,
) -> None:
    """Nobody took the operation over during the stall: the lease is extended (its token is still
    current) and the effect runs. With SQLite the extension must happen before the handler's
    transaction opens: that transaction holds the ledger's only connection."""
    from replaysafe.ledger.sqlite import SQLiteLedger
    from replaysafe.testing import FakeClock

    clock = FakeClock()
    ledger = SQLiteLedger(tmp_path / "ledger.db", clock=clock, synchronous="NORMAL")
    h = Harness(ledger=ledger, clock=clock)
    applied: list[str] = []

    async def book(ctx: Context) -> None:
        assert ctx.tx is not None
        applied.append(ctx.operation_id)

    h.handler(EO, effect=Effect.transactional(), lease=5)(book)
    h.failpoints.enable(fp.BEFORE_EFFECT, "sleep", seconds=30, when=once_for("charge:order-1"))
    await h.publish(order(1))
    h.start()
    await h.drain(seconds=90)
    await h.stop()
    await ledger.close()
    assert applied == ["charge:order-1"]
    assert h.total(o.LEASE_LOST) == 0
