"""RedisLedger passes the ledger contract on a real Redis, and keeps its promises under
concurrency, lost scripts, dropped connections and the real runtime.

Leases are judged by Redis ``TIME``, so time moves by really sleeping (short leases). Every key a
test writes lives under its ``redis_prefix`` and is deleted afterwards. Nothing here asserts speed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    DataError,
    NoPermissionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

from replaysafe import App, Context, Effect, Envelope, Guarantee, RetryPolicy, observe
from replaysafe import failpoints as fp
from replaysafe._redact import redact as redact_url
from replaysafe.brokers import MemoryBroker
from replaysafe.cli import main as cli_main
from replaysafe.clock import SystemClock
from replaysafe.errors import (
    CapabilityError,
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
)
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimRequest,
    DurabilityLevel,
    InFlight,
    Ledger,
    OpKey,
    QuarantineRequest,
    Record,
    State,
)
from replaysafe.ledger.redis import (
    BATCH_BYTES,
    BATCH_CHUNK,
    PURGE_CHUNK,
    RedisLedger,
    RedisPersistence,
    SyncRedisLedger,
    assess_persistence,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.redis.codec import _PACKED_MAX
from replaysafe.stores.redis.connection import _with_c_packer
from replaysafe.stores.redis.scripts import _SCRIPTS
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts import LedgerBackendContract
from replaysafe.testing.contracts.ledger import acquire, must_get
from replaysafe.testing.contracts.sync_ledger import through_sync_twin
from replaysafe.testing.servers import ServerUnavailable, free_port, local_redis

from .apps.explain_ledger import ENV as EXPLAIN_LEDGER
from .conftest import unavailable
from .runtime_harness import Harness

KEY = OpKey("orders", "op-1")


class TestRedisLedger(LedgerBackendContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str, redis_prefix: str) -> None:
        self.url = redis_url
        self.prefix = redis_prefix

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        return RedisLedger(self.url, prefix=self.prefix)

    async def advance(self, clock: FakeClock, seconds: float) -> None:
        # leases are judged by Redis TIME: only real time moves them
        await asyncio.sleep(seconds)


class TestRedisLedgerSyncTwin(LedgerBackendContract):
    """The whole contract with the claim path on ``RedisLedger.sync()`` (issue 14): the twin and
    the async ledger share the server and prefix, as a sync guard beside an async worker does."""

    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str, redis_prefix: str) -> None:
        self.url = redis_url
        self.prefix = redis_prefix

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        return through_sync_twin(RedisLedger(self.url, prefix=self.prefix))

    async def advance(self, clock: FakeClock, seconds: float) -> None:
        # leases are judged by Redis TIME: only real time moves them
        await asyncio.sleep(seconds)


@pytest_asyncio.fixture
async def ledger(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisLedger]:
    led = RedisLedger(redis_url, prefix=redis_prefix)
    try:
        yield led
    finally:
        await led.close()


@pytest_asyncio.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A second client: inspects keys, kills connections, flushes scripts."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def keys_under(admin: aioredis.Redis, prefix: str) -> set[bytes]:
    return {k async for k in admin.scan_iter(match=prefix + "*", count=1000)}


def with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------------- concurrency


async def test_fifty_concurrent_claims_of_one_operation_acquire_exactly_once(
    redis_url: str, redis_prefix: str
) -> None:
    # five ledgers (five connection pools, as five processes would have) x ten coroutines each
    ledgers = [RedisLedger(redis_url, prefix=redis_prefix) for _ in range(5)]
    try:
        start = asyncio.Event()

        async def claim(n: int) -> Any:
            await start.wait()
            return await ledgers[n % 5].claim(KEY, "fp", f"w{n}", 60.0)

        tasks = [asyncio.create_task(claim(n)) for n in range(50)]
        await asyncio.sleep(0)
        start.set()
        outcomes = await asyncio.gather(*tasks)
        winners = [o for o in outcomes if isinstance(o, Acquired)]
        assert len(winners) == 1, outcomes
        assert sum(isinstance(o, InFlight) for o in outcomes) == 49
        record = await must_get(ledgers[0], KEY)
        assert (record.owner, record.token, record.attempts) == (
            winners[0].claim.owner,
            winners[0].claim.token,
            1,
        )
    finally:
        for led in ledgers:
            await led.close()


async def test_fifty_concurrent_takeovers_of_an_expired_lease_acquire_exactly_once(
    ledger: RedisLedger,
) -> None:
    first = await acquire(ledger, KEY, 0.2)
    await asyncio.sleep(0.4)
    outcomes = await asyncio.gather(*(ledger.claim(KEY, "fp-a", f"w{n}", 60.0) for n in range(50)))
    winners = [o.claim for o in outcomes if isinstance(o, Acquired)]
    assert len(winners) == 1, outcomes
    assert (winners[0].attempt, winners[0].recovered) == (2, True)
    assert winners[0].token > first.token


# ---------------------------------------------------------------------- round trips


class CountingConnection(Connection):
    """Counts writes to the socket: a pipeline is one write, however many commands it holds."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


@pytest_asyncio.fixture
async def counted(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisLedger]:
    pool = ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    led = RedisLedger(redis_url, prefix=redis_prefix, client=client)
    try:
        yield led
    finally:
        await led.close()
        await client.aclose()


async def round_trips(call: Callable[[], Any]) -> tuple[int, Any]:
    before = CountingConnection.sends
    result = await call()
    return CountingConnection.sends - before, result


async def test_claim_many_and_complete_many_are_one_round_trip_each(counted: RedisLedger) -> None:
    # warm up: the connection handshake and the scripts (a first EVALSHA may meet NOSCRIPT)
    warm = await acquire(counted, OpKey("warm", "up"), 5.0)
    await counted.complete(warm)
    assert (await round_trips(lambda: counted.claim(OpKey("warm", "x"), "fp", "w", 5.0)))[0] == 1

    requests = [ClaimRequest(OpKey("batch", f"op-{i}"), "fp", "w1", 30.0) for i in range(25)]
    trips, outcomes = await round_trips(lambda: counted.claim_many(requests))
    assert trips == 1
    assert all(isinstance(o, Acquired) for o in outcomes)
    claims = [o.claim for o in outcomes]
    assert [c.key for c in claims] == [r.key for r in requests]  # request order
    assert all(a.token < b.token for a, b in itertools.pairwise(claims))

    await counted.release(claims[3])  # makes claims[3] stale for the batch below
    items = [(c, f"r{i}") for i, c in enumerate(claims)]
    trips, results = await round_trips(lambda: counted.complete_many(items))
    assert trips == 1
    assert isinstance(results[3], LeaseLost)
    done = [r for i, r in enumerate(results) if i != 3]
    assert all(isinstance(r, Record) and r.state is State.COMPLETED for r in done)
    assert [r.key for r in done if isinstance(r, Record)] == [
        c.key for i, c in enumerate(claims) if i != 3
    ]
    assert (await must_get(counted, claims[3].key)).state is State.RELEASED


# ---------------------------------------------------------------------- batch scripts


async def test_a_batch_is_one_round_trip_per_chunk(counted: RedisLedger) -> None:
    warm = await acquire(counted, OpKey("warm", "up"), 5.0)  # handshake and script loading
    await counted.complete(warm)
    n = BATCH_CHUNK + 100  # two chunks
    requests = [ClaimRequest(OpKey("chunks", f"op-{i}"), "fp", "w", 30.0) for i in range(n)]
    trips, outcomes = await round_trips(lambda: counted.claim_many(requests))
    assert trips == 2
    claims = [o.claim for o in outcomes if isinstance(o, Acquired)]
    assert [c.key for c in claims] == [r.key for r in requests]
    trips, done = await round_trips(lambda: counted.complete_many([(c, None) for c in claims]))
    assert trips == 2
    assert all(isinstance(d, Record) and d.state is State.COMPLETED for d in done)
    # a chunk also ends at BATCH_BYTES: three results of 0.6 MiB go in two script calls
    big = [await acquire(counted, OpKey("big", str(i)), 30.0) for i in range(3)]
    results = [chr(ord("a") + i) * (BATCH_BYTES * 6 // 10) for i in range(3)]
    items = list(zip(big, results, strict=True))
    trips, done = await round_trips(lambda: counted.complete_many(items))
    assert trips == 2
    assert [d.result for d in done if isinstance(d, Record)] == results
    assert [(await must_get(counted, c.key)).result for c in big] == results


def view(item: Any) -> tuple[Any, ...]:
    """An outcome, record or LeaseLost without its timestamps (which differ between two runs;
    tokens do not: two fresh prefixes issue the same tokens for the same history)."""
    if item is None:
        return ("missing",)
    if isinstance(item, LeaseLost):
        return ("LeaseLost", str(item))
    if isinstance(item, Record):
        r = item
        return (
            "Record", r.key, r.fingerprint, r.state, r.token, r.owner, r.attempts, r.result,
            r.last_error, r.lease_until is None, r.completed_at is None,
        )  # fmt: skip
    if isinstance(item, Acquired):
        c = item.claim
        return ("Acquired", c.key, c.fingerprint, c.token, c.owner, c.attempt, c.recovered)
    return (type(item).__name__, *view(item.record))


async def complete_each(
    led: RedisLedger, items: list[tuple[Claim, str | None]]
) -> list[Record | LeaseLost]:
    out: list[Record | LeaseLost] = []
    for claim, result in items:
        try:
            out.append(await led.complete(claim, result))
        except LeaseLost as exc:
            out.append(exc)
    return out


async def drop_prefix(led: RedisLedger) -> None:
    client = led._client
    found = [k async for k in client.scan_iter(match=led.prefix + "*", count=1000)]
    for i in range(0, len(found), 1000):
        await client.delete(*found[i : i + 1000])
    await led.close()


async def _setup_mix(led: RedisLedger, keys: list[OpKey]) -> list[Claim]:
    """The same history on any ledger: by ``i % 6`` a key is new, completed, quarantined,
    released, in flight (live lease) or in flight with its lease already over (lease 0).
    Returns the released and expired claims (stale, or about to be)."""
    setup = [
        ClaimRequest(k, "fp-a", "setup", 0.0 if i % 6 == 5 else 30.0)
        for i, k in enumerate(keys)
        if i % 6
    ]
    got = {o.claim.key: o.claim for o in await led.claim_many(setup) if isinstance(o, Acquired)}
    stale = []
    for i, k in enumerate(keys):
        if i % 6 == 1:
            await led.complete(got[k], f"done-{i}")
        elif i % 6 == 2:
            request = QuarantineRequest(k.scope, QuarantineReason.MAX_ATTEMPTS, k.operation_id)
            await led.quarantine(request, got[k])
        elif i % 6 == 3:
            await led.release(got[k], f"error-{i}")
            stale.append(got[k])
        elif i % 6 == 5:
            stale.append(got[k])
    return stale


def _kind(outcome: Any) -> str:
    if isinstance(outcome, Acquired):
        return f"Acquired/{outcome.claim.attempt}/{outcome.claim.recovered}"
    return type(outcome).__name__


async def test_a_mixed_batch_of_600_equals_600_single_calls(redis_url: str) -> None:
    """Across a chunk boundary: duplicates (one pair straddling the boundary), conflicts,
    completed, quarantined, released, live and expired operations; then a complete_many of
    good, stale and duplicate claims. Two fresh prefixes: batch forms vs single calls."""
    batch_led, single_led = (
        RedisLedger(redis_url, prefix=f"rs-test:{uuid.uuid4().hex[:10]}:") for _ in range(2)
    )
    try:
        keys = [OpKey("mix" if i % 2 else "mix:2", f"op-{i}") for i in range(420)]
        boundary = OpKey("mix", "boundary")
        stale = [await _setup_mix(led, keys) for led in (batch_led, single_led)]
        assert [view(Acquired(c)) for c in stale[0]] == [view(Acquired(c)) for c in stale[1]]
        requests = []
        for j in range(600):
            key = keys[j if j < len(keys) else (j * 7) % len(keys)]  # the last 180 repeat keys
            fingerprint = "fp-b" if j % 13 == 0 else "fp-a"  # a conflict on every path
            lease = 0.0 if j % 11 == 0 else 30.0  # lease 0: the next claim takes it over
            requests.append(ClaimRequest(key, fingerprint, f"w{j % 3}", lease))
        # the items either side of the chunk boundary claim one new operation
        requests[BATCH_CHUNK - 1] = ClaimRequest(boundary, "fp-a", "w-left", 30.0)
        requests[BATCH_CHUNK] = ClaimRequest(boundary, "fp-a", "w-right", 30.0)

        batch = await batch_led.claim_many(requests)
        single = [await single_led.claim(r.key, r.fingerprint, r.owner, r.lease) for r in requests]
        assert [view(o) for o in batch] == [view(o) for o in single]
        kinds = Counter(_kind(o) for o in batch)
        for kind in ("InFlight", "AlreadyDone", "Conflict", "Quarantined", "Acquired/1/False"):
            assert kinds[kind] > 0, kinds
        assert any(k.startswith("Acquired/2/") for k in kinds), kinds  # released, claimed again
        assert any(k.endswith("/True") for k in kinds), kinds  # an expired lease taken over
        tokens = [o.claim.token for o in batch if isinstance(o, Acquired)]
        assert tokens == sorted(set(tokens))  # strictly increasing, in request order
        left, right = batch[BATCH_CHUNK - 1], batch[BATCH_CHUNK]
        assert isinstance(left, Acquired) and isinstance(right, InFlight)
        assert right.record.owner == "w-left" and right.record.token == left.claim.token

        def completions(outcomes: list[Any], old: list[Claim]) -> list[tuple[Claim, str | None]]:
            edge = outcomes[BATCH_CHUNK - 1].claim
            fresh = [o.claim for o in outcomes if isinstance(o, Acquired) and o.claim != edge]
            claims = (fresh + old + fresh * 3)[:600]  # good, stale, then duplicates
            claims[BATCH_CHUNK - 1] = claims[BATCH_CHUNK] = edge  # twice, across the boundary
            return [(c, None if n % 4 else f"receipt-{n}:\u2603") for n, c in enumerate(claims)]

        items = [completions(batch, stale[0]), completions(single, stale[1])]
        assert len(items[0]) == 600
        done_batch = await batch_led.complete_many(items[0])
        done_single = await complete_each(single_led, items[1])
        assert [view(d) for d in done_batch] == [view(d) for d in done_single]
        assert Counter(type(d).__name__ for d in done_batch).keys() == {"Record", "LeaseLost"}
        # the boundary claim completes once; its second completion, in the next chunk, is stale
        assert isinstance(done_batch[BATCH_CHUNK - 1], Record)
        assert isinstance(done_batch[BATCH_CHUNK], LeaseLost)
        # a refused completion says what the record is now, as check_fence words it
        edge = items[0][BATCH_CHUNK][0]
        assert f"token {edge.token} is stale (record is completed, token {edge.token})" in str(
            done_batch[BATCH_CHUNK]
        )
        assert any("(record is released, token" in str(d) for d in done_batch)
        # what was stored is the same, record by record
        for k in [*keys, boundary]:
            stored = [await led.get(k) for led in (batch_led, single_led)]
            assert view(stored[0]) == view(stored[1]), k
        # the lease_until a batch claim reports is the one stored, to the microsecond
        for o in batch:
            if isinstance(o, Acquired):
                rec = await must_get(batch_led, o.claim.key)
                if rec.token == o.claim.token and rec.state is State.IN_FLIGHT:
                    assert rec.lease_until == o.claim.lease_until
    finally:
        for led in (batch_led, single_led):
            await drop_prefix(led)


_KEYS = [OpKey(scope, op) for scope in ("s", "s:t") for op in ("1", "2", "t:1")]
_CLAIM_REQUEST = st.builds(
    ClaimRequest,
    st.sampled_from(_KEYS),
    st.sampled_from(["fp-a", "fp-b"]),
    st.sampled_from(["w1", "w2"]),
    st.sampled_from([0.0, 30.0]),  # over at once (the next claim takes over) or live
)
_RESULT = st.sampled_from([None, "", "ok", "r\u00e9\udcff"])
_STEP = st.one_of(
    st.tuples(st.just("claim"), st.lists(_CLAIM_REQUEST, min_size=1, max_size=8)),
    st.tuples(
        st.just("complete"),
        st.lists(st.tuples(st.integers(0, 63), _RESULT), min_size=1, max_size=8),
    ),
    st.tuples(st.just("release"), st.integers(0, 63)),
    st.tuples(st.just("quarantine"), st.integers(0, 63)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=12))
def test_batch_forms_equal_single_calls_on_any_history(
    redis_url: str, steps: list[tuple[str, Any]]
) -> None:
    """claim_many vs a loop of claim and complete_many vs a loop of complete, on two fresh
    prefixes, step by step through a random history (with releases and quarantines between)."""

    async def run() -> None:
        batch_led, single_led = (
            RedisLedger(redis_url, prefix=f"rs-test:{uuid.uuid4().hex[:10]}:") for _ in range(2)
        )
        claims: tuple[list[Claim], list[Claim]] = ([], [])
        try:
            for kind, arg in steps:
                if kind == "claim":
                    got = await batch_led.claim_many(arg)
                    want = [
                        await single_led.claim(r.key, r.fingerprint, r.owner, r.lease) for r in arg
                    ]
                    assert [view(o) for o in got] == [view(o) for o in want]
                    for mine, outcomes in zip(claims, (got, want), strict=True):
                        mine.extend(o.claim for o in outcomes if isinstance(o, Acquired))
                elif not claims[0]:
                    continue
                elif kind == "complete":
                    picks = [(claims[0][i % len(claims[0])], r) for i, r in arg]
                    got_done = await batch_led.complete_many(picks)
                    picks = [(claims[1][i % len(claims[1])], r) for i, r in arg]
                    assert [view(d) for d in got_done] == [
                        view(d) for d in await complete_each(single_led, picks)
                    ]
                else:
                    seen = []
                    for led, mine in zip((batch_led, single_led), claims, strict=True):
                        claim = mine[arg % len(mine)]
                        try:
                            if kind == "release":
                                await led.release(claim, "boom")
                            else:
                                request = QuarantineRequest(
                                    claim.key.scope, QuarantineReason.MAX_ATTEMPTS, "q"
                                )
                                await led.quarantine(request, claim)
                            seen.append("ok")
                        except LeaseLost as exc:
                            seen.append(str(exc))
                    assert seen[0] == seen[1]
            for k in _KEYS:
                assert view(await batch_led.get(k)) == view(await single_led.get(k)), k
        finally:
            for led in (batch_led, single_led):
                await drop_prefix(led)

    asyncio.run(run())


async def test_a_foreign_value_mid_batch_never_lets_a_token_be_issued_twice(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    # item 2 of 3 meets a string where a record should be: the script stops there with an error
    keys = [OpKey("mid", str(i)) for i in range(3)]
    await admin.set(ledger.key_for(keys[1]), "not a hash")
    requests = [ClaimRequest(k, "fp", "w", 30.0) for k in keys]
    with pytest.raises(ConfigurationError, match="prefix of its own"):
        await ledger.claim_many(requests)
    # item 1 was written before the error; the counter was advanced for it all the same
    first = await must_get(ledger, keys[0])
    assert first.state is State.IN_FLIGHT
    assert await ledger.get(keys[2]) is None
    later = await acquire(ledger, OpKey("mid", "later"), 30.0)
    assert later.token > first.token


@pytest.mark.parametrize("value", ["1e5", " 5", "0x10", "five"])
async def test_a_token_counter_that_is_not_an_integer_stops_a_claim_before_any_write(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str, value: str
) -> None:
    await admin.set(redis_prefix + "token", value)
    with pytest.raises(ConfigurationError, match="prefix of its own"):
        await ledger.claim_many(
            [ClaimRequest(OpKey("t", str(i)), "fp", "w", 30.0) for i in range(3)]
        )
    assert await keys_under(admin, redis_prefix) == {(redis_prefix + "token").encode()}
    assert await admin.get(redis_prefix + "token") == value.encode()


async def test_a_malformed_request_is_a_bug_report_and_writes_nothing(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    key = ledger.key_for(KEY)
    for blob in (b"", b"\x05\x00\x00\x00ab", b"x" * 41):
        with pytest.raises(LedgerError, match="replaysafe bug") as raised:
            await ledger._eval(
                _SCRIPTS["claim"], [ledger._p + b"token", key], [blob], what="claim", now_at=0
            )
        assert not isinstance(raised.value, LedgerUnavailable)
    assert await keys_under(admin, redis_prefix) == set()


async def test_purge_deletes_a_record_only_through_its_current_completion(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    async with RedisLedger(redis_url, prefix=redis_prefix, retention=60.0) as led:
        first = await led.complete(await acquire(led, KEY, 30.0))
        assert first.completed_at is not None
        # the record vanishes (TTL, an operator), the operation comes again and completes later
        await admin.delete(led.key_for(KEY))
        await asyncio.sleep(0.05)
        second = await led.complete(await acquire(led, KEY, 30.0))
        assert second.completed_at is not None and second.completed_at > first.completed_at
        # a cutoff between the two: the first entry is stale and must not delete the record
        cutoff = (first.completed_at + second.completed_at) / 2
        assert await led.purge(cutoff) == 0
        assert (await must_get(led, KEY)).completed_at == second.completed_at
        assert await admin.llen(redis_prefix + "completions") == 1  # the stale entry left
        # an unreadable entry at the head is dropped, never a wall: by purge ...
        await admin.lpush(redis_prefix + "completions", "garbage")
        assert await led.purge(second.completed_at + 1.0) == 1
        assert await led.get(KEY) is None
        assert await admin.llen(redis_prefix + "completions") == 0
        # ... and by a completion's trimming, which still completes
        await admin.lpush(redis_prefix + "completions", "garbage")
        other = await led.complete(await acquire(led, OpKey("orders", "other"), 30.0))
        assert other.state is State.COMPLETED
        assert await admin.lrange(redis_prefix + "completions", 0, -1) == [
            b"%d:%b" % (round((other.completed_at or 0) * 1e6), led.key_for(other.key))
        ]


async def test_completions_trim_the_log_a_bounded_step_at_a_time(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    log = redis_prefix + "completions"
    async with RedisLedger(redis_url, prefix=redis_prefix, retention=1.0) as led:
        for i in range(5):
            await led.complete(await acquire(led, OpKey("trim", str(i)), 30.0))
        assert await admin.llen(log) == 5
        await asyncio.sleep(1.2)  # all five are past the retention now
        # a completion of one item drops at most two old entries (bounded work per call) ...
        lengths = []
        for i in range(4):
            await led.complete(await acquire(led, OpKey("trim", f"new-{i}"), 30.0))
            lengths.append(await admin.llen(log))
        assert lengths[:2] == [5 - 2 + 1, 5 - 2 - 2 + 2]
        # ... and stops at the first entry within the retention: only the new ones are left
        entries = await admin.lrange(log, 0, -1)
        assert [e.rpartition(b":")[2] for e in entries] == [b"new-0", b"new-1", b"new-2", b"new-3"]


def test_the_ledgers_own_connections_pack_in_c_and_send_the_same_bytes(redis_url: str) -> None:
    import redis.utils

    led = RedisLedger(redis_url, prefix="p:")
    cls = led._client.connection_pool.connection_class
    # hiredis comes with the redis extra; without it the class is redis-py's own
    assert (cls is not Connection) is redis.utils.HIREDIS_AVAILABLE
    assert issubclass(cls, Connection)
    fast, plain = cls(), Connection()
    for args in (
        ("EVALSHA", "ab" * 20, 2, b"p:token", b"p:op:1:s:\xff", b"\x00\x01blob", "30"),
        ("EVALSHA", "ab" * 20, 101, b"p:token", *(b"p:op:1:s:%d" % i for i in range(100)), b"b"),
        ("SCRIPT LOAD", b"return 1"),
        ("HGETALL", b"p:op:1:s:x"),
        ("SET", "k", 1.5),
    ):
        assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args)), args


def test_without_hiredis_the_connection_class_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis.utils

    monkeypatch.setattr(redis.utils, "HIREDIS_AVAILABLE", False)
    assert _with_c_packer(Connection) is Connection
    monkeypatch.setitem(sys.modules, "hiredis", None)  # not installed: import fails
    monkeypatch.setattr(redis.utils, "HIREDIS_AVAILABLE", True)
    assert _with_c_packer(Connection) is Connection


# ---------------------------------------------------------------------- keys


_NEVER_CONNECTS = RedisLedger("redis://127.0.0.1:1/0", prefix="p:")


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.text("a:1%{}"), st.text("a:1%{}")),
    st.tuples(st.text("a:1%{}"), st.text("a:1%{}")),
)
def test_record_keys_are_injective(left: tuple[str, str], right: tuple[str, str]) -> None:
    key_for = _NEVER_CONNECTS.key_for
    same_key = key_for(OpKey(*left)) == key_for(OpKey(*right))
    assert same_key == (left == right)


async def test_scopes_with_separators_never_share_a_key(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    left, right = OpKey("a:b", "c"), OpKey("a", "b:c")
    assert ledger.key_for(left) != ledger.key_for(right)
    await acquire(ledger, left, 30.0)
    await acquire(ledger, right, 30.0, fingerprint="another payload")  # no Conflict, no InFlight
    found = await keys_under(admin, redis_prefix)
    assert {ledger.key_for(left), ledger.key_for(right)} <= found
    assert all(k.startswith(redis_prefix.encode()) for k in found)
    assert await admin.hget(ledger.key_for(left), "scope") == b"a:b"
    assert await admin.hget(ledger.key_for(right), "operation_id") == b"b:c"


async def test_unicode_and_surrogates_round_trip(ledger: RedisLedger) -> None:
    key = OpKey("zahlung:€", "bestellung:\udcff:1")  # a lone surrogate must not crash the driver
    claim = await acquire(ledger, key, 30.0, owner="wörker")
    done = await ledger.complete(claim, "quittung:\u2603")
    assert (done.key, done.owner, done.result) == (key, "wörker", "quittung:\u2603")
    assert await ledger.get(key) == done


# ---------------------------------------------------------------------- lifetimes


async def test_completed_records_get_the_retention_ttl_and_open_ones_none(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    async with RedisLedger(redis_url, prefix=redis_prefix, retention=3600.0) as led:
        done = OpKey("orders", "done")
        await led.complete(await acquire(led, done, 30.0), "ok")
        ttl_ms = await admin.pttl(led.key_for(done))
        assert 0 < ttl_ms <= 3_600_000
        open_keys = [OpKey("orders", n) for n in ("in-flight", "released", "quarantined")]
        await acquire(led, open_keys[0], 30.0)
        await led.release(await acquire(led, open_keys[1], 30.0))
        request = QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, "quarantined")
        entry = await led.quarantine(request, await acquire(led, open_keys[2], 30.0))
        for key in open_keys:
            assert await admin.pttl(led.key_for(key)) == -1, key  # -1: exists, no TTL
        assert await admin.pttl(redis_prefix + "q:" + entry.id) == -1


async def test_a_completed_record_expires_at_the_retention_and_the_log_follows(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    async with RedisLedger(redis_url, prefix=redis_prefix, retention=0.5) as led:
        first = await acquire(led, KEY, 30.0)
        await led.complete(first)
        log = redis_prefix + "completions"
        assert await admin.llen(log) == 1
        for _ in range(100):  # bounded: 10 s for a 0.5 s TTL
            if await led.get(KEY) is None:
                break
            await asyncio.sleep(0.1)
        assert await led.get(KEY) is None
        # beyond the horizon the operation is new again (that is what retention means) ...
        again = await acquire(led, KEY, 30.0)
        assert (again.attempt, again.recovered) == (1, False)
        assert again.token > first.token
        # ... and the next completion drops log entries of records the TTL removed
        later = await led.complete(await acquire(led, OpKey("orders", "later"), 30.0))
        assert later.completed_at is not None
        entries = await admin.lrange(log, 0, -1)
        assert entries == [
            b"%d:%b" % (round(later.completed_at * 1e6), led.key_for(OpKey("orders", "later")))
        ]


async def test_purge_skips_stale_log_entries_and_removes_them(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    await ledger.complete(await acquire(ledger, KEY, 30.0))
    # the record vanishes behind the index's back (TTL, an operator), then is claimed again
    await admin.delete(ledger.key_for(KEY))
    await acquire(ledger, KEY, 30.0)
    await asyncio.sleep(0.05)
    assert await ledger.purge(ledger.now() + 1.0) == 0
    assert (await must_get(ledger, KEY)).state is State.IN_FLIGHT  # never purge a live claim
    assert await admin.llen(redis_prefix + "completions") == 0


async def test_purge_works_through_more_than_one_chunk(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    n = PURGE_CHUNK + 50
    requests = [ClaimRequest(OpKey("bulk", f"op-{i}"), "fp", "w", 60.0) for i in range(n)]
    outcomes = await ledger.claim_many(requests)
    results = await ledger.complete_many(
        [(o.claim, None) for o in outcomes if isinstance(o, Acquired)]
    )
    assert sum(isinstance(r, Record) for r in results) == n
    await asyncio.sleep(0.05)
    cutoff = ledger.now() + 1.0
    assert await ledger.purge(cutoff, limit=PURGE_CHUNK + 30) == PURGE_CHUNK + 30
    assert await ledger.purge(cutoff) == 20
    assert await ledger.purge(cutoff) == 0
    assert await admin.llen(redis_prefix + "completions") == 0
    assert [k for k in await keys_under(admin, redis_prefix) if b"op:" in k] == []


# ---------------------------------------------------------------------- scripts


async def test_scripts_are_reloaded_after_script_flush(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    claim = await acquire(ledger, KEY, 30.0)  # the scripts are loaded now
    await admin.script_flush()
    # NOSCRIPT means the script did not run: it is loaded and the call repeated, once
    second = await acquire(ledger, OpKey("orders", "op-2"), 30.0)
    assert second.token > claim.token
    await admin.script_flush()
    batch = await ledger.claim_many(
        [ClaimRequest(OpKey("orders", f"b-{i}"), "fp", "w", 30.0) for i in range(5)]
    )
    assert all(isinstance(o, Acquired) for o in batch)
    await admin.script_flush()
    done = await ledger.complete_many([(claim, "a"), (second, "b")])
    assert [r.state for r in done if isinstance(r, Record)] == [State.COMPLETED] * 2
    # and no call ran twice: each operation was claimed once
    assert all(r.attempts == 1 for r in done if isinstance(r, Record))


# ---------------------------------------------------------------------- persistence


async def test_the_local_server_persistence_is_reported_honestly(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    report = await ledger.persistence_report()
    actual = {
        name: (await admin.config_get(name))[name]
        for name in ("appendonly", "appendfsync", "maxmemory-policy")
    }
    assert (report.appendonly, report.appendfsync, report.maxmemory_policy) == (
        actual["appendonly"],
        actual["appendfsync"],
        actual["maxmemory-policy"],
    )
    assert report.known
    if actual["appendonly"] == "no":  # the local test server: appendonly no, save ""
        assert report.can_back_claims is False
        assert "restart" in report.sentence and "appendfsync always" in report.sentence


def fake_config(values: dict[str, str] | Exception) -> Callable[..., Any]:
    async def config_get(pattern: str = "*", *args: Any, **kwargs: Any) -> dict[str, str]:
        if isinstance(values, Exception):
            raise values
        return {pattern: values[pattern]} if pattern in values else {}  # redis-py's shape

    return config_get


@pytest.mark.parametrize(
    ("config", "can", "words"),
    [
        ({"appendonly": "yes", "appendfsync": "always", "save": "", "maxmemory-policy":
          "noeviction"}, True, "survives a crash or power loss"),
        ({"appendonly": "yes", "appendfsync": "everysec", "save": "", "maxmemory-policy":
          "noeviction"}, False, "about the last second"),
        ({"appendonly": "no", "appendfsync": "everysec", "save": "3600 1", "maxmemory-policy":
          "noeviction"}, False, "since the last snapshot"),
        ({"appendonly": "no", "appendfsync": "everysec", "save": "", "maxmemory-policy":
          "noeviction"}, False, "forgets every claim"),
        ({"appendonly": "yes", "appendfsync": "always", "save": "", "maxmemory-policy":
          "allkeys-lru"}, False, "may evict ledger records"),
    ],
)  # fmt: skip
async def test_persistence_report_reads_the_config_reply(
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, str],
    can: bool,
    words: str,
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    monkeypatch.setattr(client, "config_get", fake_config(config))
    async with RedisLedger(redis_url, prefix=redis_prefix, client=client) as led:
        report = await led.persistence_report()
    await client.aclose()
    assert isinstance(report, RedisPersistence)
    assert report.can_back_claims is can
    assert words in report.sentence
    assert (report.appendonly, report.appendfsync) == (config["appendonly"], config["appendfsync"])


@pytest.mark.parametrize(
    "error",
    [ResponseError("ERR unknown command 'CONFIG'"), NoPermissionError("NOPERM config|get")],
)
async def test_persistence_report_with_config_disabled_is_unknown(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    monkeypatch.setattr(client, "config_get", fake_config(error))
    async with RedisLedger(redis_url, prefix=redis_prefix, client=client) as led:
        report = await led.persistence_report()
    await client.aclose()
    assert (report.known, report.can_back_claims) == (False, False)
    assert "unknown" in report.sentence
    assert assess_persistence(None) == report


# ---------------------------------------------------------------------- durability (explain)

#: CONFIG SET values per case; each test sets all four, so nothing leaks between tests
_NOEVICT = {"maxmemory-policy": "noeviction"}
_DURABILITY_CASES = [
    ("no persistence", {"appendonly": "no", "save": "", "appendfsync": "everysec"},
     DurabilityLevel.NOT_DURABLE, "RS110", 1),
    ("rdb snapshots only", {"appendonly": "no", "save": "3600 1", "appendfsync": "everysec"},
     DurabilityLevel.NOT_DURABLE, "RS110", 1),
    ("aof fsynced every second", {"appendonly": "yes", "save": "", "appendfsync": "everysec"},
     DurabilityLevel.LOSES_RECENT, "RS118", 0),
    ("aof fsynced by the os", {"appendonly": "yes", "save": "", "appendfsync": "no"},
     DurabilityLevel.LOSES_RECENT, "RS118", 0),
    ("aof fsynced on every write", {"appendonly": "yes", "save": "", "appendfsync": "always"},
     DurabilityLevel.DURABLE, None, 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A redis-server of this module's own: CONFIG SET on the shared Redis would change the
    persistence every other test (and engineer) sees."""
    try:
        with local_redis() as url:
            yield url
    except ServerUnavailable as exc:
        unavailable("Redis (private redis-server)", str(exc))


def configure(url: str, settings: dict[str, str]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for name, value in {**_NOEVICT, **settings}.items():
            client.config_set(name, value)
        for name, value in {**_NOEVICT, **settings}.items():  # read back: the server took it
            assert client.config_get(name)[name] == value, name
        # turning AOF on writes the initial AOF in the background; until it is written Redis
        # refuses to shut down on SIGTERM ("Writing initial AOF, can't exit"): wait for it
        for _ in range(200):  # bounded: 200 x 50 ms
            info = client.info("persistence")
            if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the initial AOF was not written within 10 s: {info}")
    finally:
        client.close()


@pytest.mark.parametrize(
    ("settings", "level", "finding", "strict_exit"),
    [c[1:] for c in _DURABILITY_CASES],
    ids=[c[0] for c in _DURABILITY_CASES],
)
def test_explain_judges_the_live_server_persistence(
    private_redis: str,
    settings: dict[str, str],
    level: DurabilityLevel,
    finding: str | None,
    strict_exit: int,
) -> None:
    """``durability()`` reads the server as it is configured now; ``replaysafe explain
    --strict`` fails (exit 1, RS110) on a Redis that forgets claims on restart, warns (RS118)
    where a machine crash can lose the last second, and says nothing where every write is
    fsynced."""
    configure(private_redis, settings)

    async def read() -> Any:
        async with RedisLedger(private_redis, prefix="rs-durability:") as led:
            return await led.durability()

    durability = asyncio.run(read())
    assert durability.level is level
    assert durability.durable is (level is DurabilityLevel.DURABLE)
    assert f"appendonly={settings['appendonly']}" in durability.setting
    assert f"appendfsync={settings['appendfsync']}" in durability.setting
    result = CliRunner().invoke(
        cli_main,
        ["explain", "tests.apps.explain_ledger:app", "--json", "--strict"],
        env={EXPLAIN_LEDGER: private_redis},
    )
    assert result.exit_code == strict_exit, result.output
    [handler] = json.loads(result.output)["handlers"]
    found = {f["id"]: f for f in handler["findings"]}
    durability_ids = {"RS110", "RS111", "RS118"} & set(found)
    assert durability_ids == ({finding} if finding else set()), handler["findings"]
    if finding is not None:
        assert found[finding]["severity"] == ("error" if finding == "RS110" else "warning")
        assert f"appendfsync={settings['appendfsync']}" in found[finding]["message"]


def test_explain_strict_fails_on_a_redis_without_persistence(private_redis: str) -> None:
    """A Redis with appendonly no and no snapshots is what issue 13 saw: explain used to warn
    RS111 "does not say" and --strict passed. The human-readable output names the setting."""
    configure(private_redis, {"appendonly": "no", "save": "", "appendfsync": "everysec"})
    result = CliRunner().invoke(
        cli_main,
        ["explain", "tests.apps.explain_ledger:app", "--strict"],
        env={EXPLAIN_LEDGER: private_redis},
    )
    assert result.exit_code == 1, result.output
    assert "ERROR RS110" in result.output and "RS111" not in result.output
    assert "appendonly=no" in result.output


async def test_durability_is_unknown_where_config_is_not_permitted(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    monkeypatch.setattr(client, "config_get", fake_config(NoPermissionError("NOPERM config")))
    async with RedisLedger(redis_url, prefix=redis_prefix, client=client) as led:
        durability = await led.durability()
    await client.aclose()
    assert (durability.level, durability.durable) == (DurabilityLevel.UNKNOWN, None)
    assert "not permitted" in durability.setting


async def test_explain_of_an_unreachable_redis_says_unknown_instead_of_failing() -> None:
    from replaysafe.explain import explain

    app = App("down", broker=MemoryBroker(),
              ledger=RedisLedger(f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=1",
                                 prefix="rs-down:"))  # fmt: skip
    app.handler("payments", guarantee=Guarantee.EFFECTIVELY_ONCE,
                effect=Effect.keyed("payments-api"))(_noop)  # fmt: skip
    [handler] = (await explain(app)).handlers
    [rs111] = [f for f in handler.findings if f.id == "RS111"]
    assert "could not be asked" in rs111.message
    assert not {"RS110", "RS118"} & {f.id for f in handler.findings}
    await app.ledger.close()


async def _noop(ctx: Context) -> None:
    return None


# ---------------------------------------------------------------------- data errors


async def test_a_script_failing_on_stored_data_is_a_data_error_not_an_outage(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    entry = await ledger.quarantine(
        QuarantineRequest("orders", QuarantineReason.MALFORMED_PAYLOAD, message=b"{")
    )
    # a value the ledger did not write, where its redrive script counts (HINCRBY fails on it)
    await admin.hset(redis_prefix + "q:" + entry.id, "redrives", "not a number")
    with pytest.raises(LedgerDataError, match="refused this call's data") as raised:
        await ledger.redrive(entry.id)
    assert not isinstance(raised.value, LedgerUnavailable)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ResponseError("user_script:7: attempt to compare nil with number script: ab, on "
                       "@user_script:7."), LedgerDataError),
        (ResponseError("hash value is not an integer script: ab, on @user_script:3."),
         LedgerDataError),
        (DataError("Invalid input of type: 'dict'"), LedgerDataError),
        # the server's state, even when raised inside a script: an outage, retried
        (ResponseError("MISCONF Redis is configured to save RDB snapshots script: ab, on "
                       "@user_script:3."), LedgerUnavailable),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'. script: ab, on "
                          "@user_script:3."), LedgerUnavailable),
        (ResponseError("BUSY Redis is busy running a script"), LedgerUnavailable),
        (RedisConnectionError("Connection refused"), LedgerUnavailable),
    ],
)  # fmt: skip
def test_errors_are_data_errors_only_when_the_data_caused_them(
    error: Exception, expected: type[Exception]
) -> None:
    led = RedisLedger("redis://127.0.0.1:1/0")
    mapped = led._codec.unavailable(error, "claim", sent=True)
    assert type(mapped) is expected, mapped


# ---------------------------------------------------------------------- dropped connections


class Proxy:
    """A TCP proxy in front of Redis that can swallow a request or drop a reply, so a call can be
    cut at an exact point without pausing the shared Redis server."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.mode = "pass"  # "hold": swallow requests · "drop_reply": forward, then cut the reply
        self.held = asyncio.Event()
        self.dropped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.upstream)
        sent = asyncio.Event()

        async def up() -> None:
            while data := await cr.read(65536):
                if self.mode == "hold":
                    self.held.set()  # the request never reaches Redis
                    continue
                uw.write(data)
                await uw.drain()
                sent.set()
            uw.close()

        async def down() -> None:
            while data := await ur.read(65536):
                if self.mode == "drop_reply" and sent.is_set():
                    self.mode = "pass"
                    self.dropped.set()  # Redis ran the command; its reply is lost
                    break
                cw.write(data)
                await cw.drain()
            cw.close()
            uw.close()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(up(), down(), return_exceptions=True)
        finally:
            self._tasks.discard(task)

    def url(self, db: int, **params: str) -> str:
        return with_query(f"redis://127.0.0.1:{self.port}/{db}", **params)


def _endpoint(url: str) -> tuple[str, int, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379, int(parts.path.strip("/") or 0)


async def kill_named(admin: aioredis.Redis, name: str) -> int:
    """CLIENT KILL every connection named ``name`` (only ours: the name is unique per test)."""
    killed = 0
    for c in await admin.client_list():
        if c.get("name") == name:
            killed += int(await admin.execute_command("CLIENT", "KILL", "ID", c["id"]))
    return killed


async def test_connection_killed_mid_call_is_ledger_unavailable_and_the_ledger_recovers(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    host, port, db = _endpoint(redis_url)
    name = f"rs-test-{uuid.uuid4().hex[:8]}"
    async with Proxy(host, port) as proxy:
        # no driver retries: the cut must surface as LedgerUnavailable, never a redis exception
        client = aioredis.Redis.from_url(
            proxy.url(db, client_name=name), retry=Retry(NoBackoff(), 0)
        )
        led = RedisLedger(redis_url, prefix=redis_prefix, client=client)
        try:
            assert await led.get(KEY) is None  # connected and named
            proxy.mode = "hold"
            call = asyncio.create_task(led.claim(KEY, "fp", "w1", 30.0))
            await asyncio.wait_for(proxy.held.wait(), 10)
            proxy.mode = "pass"
            assert await kill_named(admin, name) >= 1
            with pytest.raises(LedgerUnavailable, match="may or may not have run") as raised:
                await asyncio.wait_for(call, 10)
            assert isinstance(raised.value.__cause__, RedisError)
            # the request never reached Redis: the operation is still free, the ledger works
            assert await led.get(KEY) is None
            assert isinstance(await led.claim(KEY, "fp", "w1", 30.0), Acquired)
        finally:
            await led.close()
            await client.aclose()


async def test_connection_killed_mid_call_succeeds_on_the_drivers_retry(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    host, port, db = _endpoint(redis_url)
    name = f"rs-test-{uuid.uuid4().hex[:8]}"
    # the ledger's own client (built from the URL, with its few quick retries)
    async with (
        Proxy(host, port) as proxy,
        RedisLedger(proxy.url(db, client_name=name), prefix=redis_prefix) as led,
    ):
        assert await led.get(KEY) is None
        proxy.mode = "hold"
        call = asyncio.create_task(led.claim(KEY, "fp", "w1", 30.0))
        await asyncio.wait_for(proxy.held.wait(), 10)
        proxy.mode = "pass"
        assert await kill_named(admin, name) >= 1
        outcome = await asyncio.wait_for(call, 10)
        assert isinstance(outcome, Acquired)
        assert outcome.claim.attempt == 1


async def test_a_lost_reply_is_unavailable_and_the_claim_may_exist(
    redis_url: str, redis_prefix: str
) -> None:
    host, port, db = _endpoint(redis_url)
    async with Proxy(host, port) as proxy:
        client = aioredis.Redis.from_url(proxy.url(db), retry=Retry(NoBackoff(), 0))
        led = RedisLedger(redis_url, prefix=redis_prefix, client=client)
        try:
            assert await led.get(KEY) is None
            proxy.mode = "drop_reply"
            with pytest.raises(LedgerUnavailable, match="may or may not have run"):
                await asyncio.wait_for(led.claim(KEY, "fp", "w1", 30.0), 10)
            assert proxy.dropped.is_set()
            # it did run: the claim is held (until its lease ends), so nobody else runs it now
            assert isinstance(await led.claim(KEY, "fp", "w2", 30.0), InFlight)
            record = await must_get(led, KEY)
            assert record.owner == "w1"
            # a completion whose reply is lost: done, though the caller cannot know it
            claim = Claim(KEY, "fp", record.token, "w1", record.lease_until or 0.0, 1)
            proxy.mode = "drop_reply"
            with pytest.raises(LedgerUnavailable, match="may or may not have run"):
                await asyncio.wait_for(led.complete(claim, "receipt"), 10)
            with pytest.raises(LeaseLost):  # retrying it is refused, conservatively ...
                await led.complete(claim, "receipt")
            outcome = await led.claim(KEY, "fp", "w2", 30.0)  # ... and the next copy sees it
            assert isinstance(outcome, AlreadyDone)
            assert outcome.record.result == "receipt"
        finally:
            await led.close()
            await client.aclose()


@pytest.mark.parametrize("driver_retries", [True, False])
async def test_connections_killed_while_calls_run_never_leak_a_redis_exception(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis, driver_retries: bool
) -> None:
    name = f"rs-test-{uuid.uuid4().hex[:8]}"
    url = with_query(redis_url, client_name=name)
    outcomes: dict[str, int] = {"ok": 0, "unavailable": 0}
    other: list[BaseException] = []
    client = None if driver_retries else aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    async with RedisLedger(url, prefix=redis_prefix, client=client) as led:
        stop = asyncio.Event()

        async def work(w: int) -> None:
            for i in range(400):  # bounded in count ...
                if stop.is_set():
                    return
                key = OpKey("kill", f"w{w}-{i}")
                try:
                    outcome = await led.claim(key, "fp", f"w{w}", 30.0)
                    if isinstance(outcome, Acquired):
                        await led.complete(outcome.claim, "ok")
                    await led.claim_many([ClaimRequest(key, "fp", "x", 30.0)])
                    outcomes["ok"] += 1
                except LedgerUnavailable:
                    outcomes["unavailable"] += 1
                except LeaseLost:
                    outcomes["ok"] += 1  # a retried complete whose first run happened
                except BaseException as exc:  # anything else is the failure under test
                    other.append(exc)
                    return

        workers = [asyncio.create_task(work(w)) for w in range(4)]
        killed = 0
        for _ in range(15):  # ... and in kills
            await asyncio.sleep(0.03)
            killed += await kill_named(admin, name)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        assert other == []
        assert killed >= 1, "no connection was ever killed: the test proved nothing"
        assert outcomes["ok"] > 0
        if not driver_retries:  # without retries the cuts must have surfaced, mapped
            assert outcomes["unavailable"] >= 1
        # and the ledger is healthy afterwards: without driver retries a connection killed by
        # the last round can still sit in the pool and fail one call (mapped, as above); the
        # caller's retry then gets a fresh connection
        after = None
        for _ in range(3):
            try:
                after = await led.claim(OpKey("kill", "after"), "fp", "w", 30.0)
                break
            except LedgerUnavailable:
                continue
        assert isinstance(after, Acquired)
    if client is not None:
        await client.aclose()


# ---------------------------------------------------------------------- errors, config


async def test_an_unreachable_server_is_ledger_unavailable_with_the_password_redacted() -> None:
    url = "redis://ledger:s3cr3t-pw@127.0.0.1:1/0"  # nothing listens on port 1
    led = RedisLedger(url, prefix="never:")
    assert "s3cr3t-pw" not in repr(led) and "***" in repr(led)
    try:
        for call in (
            lambda: led.claim(KEY, "fp", "w", 5.0),
            lambda: led.claim_many([ClaimRequest(KEY, "fp", "w", 5.0)]),
            lambda: led.get(KEY),
            lambda: led.quarantined(),
            lambda: led.persistence_report(),
        ):
            with pytest.raises(LedgerUnavailable, match="running and reachable") as raised:
                await asyncio.wait_for(call(), 30)
            assert "s3cr3t-pw" not in str(raised.value)
            assert "ledger:***@127.0.0.1:1" in str(raised.value)
            assert isinstance(raised.value.__cause__, RedisError)
    finally:
        await led.close()


def test_redact_url_hides_passwords_in_userinfo_and_query() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert "pw" not in redact_url("unix:///tmp/r.sock?db=0&password=pw")
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


async def test_a_foreign_value_under_the_prefix_is_a_configuration_error(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    await admin.set(ledger.key_for(KEY), "not a hash")
    with pytest.raises(ConfigurationError, match="prefix of its own"):
        await ledger.claim(KEY, "fp", "w", 5.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"prefix": ""}, {"retention": 0}, {"retention": float("nan")}, {"retention": -5}],
)
def test_invalid_configuration_is_refused(redis_url: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RedisLedger(redis_url, **kwargs)


def test_a_bad_url_or_no_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not a usable Redis URL") as raised:
        RedisLedger("http://user:pw@host/0")
    assert "user:pw" not in str(raised.value)
    with pytest.raises(ConfigurationError, match="needs a url"):
        RedisLedger()


async def test_a_decoding_client_is_refused(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ConfigurationError, match="decode_responses=False"):
            RedisLedger(prefix="x:", client=client)
    finally:
        await client.aclose()


@pytest.mark.parametrize("lease", [-1.0, float("inf"), float("nan")])
async def test_an_unusable_lease_is_refused_before_anything_is_sent(
    ledger: RedisLedger, lease: float
) -> None:
    with pytest.raises(ConfigurationError, match="lease"):
        await ledger.claim(KEY, "fp", "w", lease)
    assert await ledger.get(KEY) is None


async def test_close_is_idempotent_and_leaves_a_callers_client_open(
    redis_url: str, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    led = RedisLedger(prefix=redis_prefix, client=client)
    await led.claim(KEY, "fp", "w", 5.0)
    await led.close()
    await led.close()
    assert "closed" in repr(led)
    with pytest.raises(LedgerUnavailable, match="closed"):
        await led.get(KEY)
    assert await client.ping()  # the caller's client is the caller's to close
    await client.aclose()


# ---------------------------------------------------------------------- the sync twin


@pytest.fixture
def twin(ledger: RedisLedger) -> Iterator[SyncRedisLedger]:
    t = ledger.sync()
    try:
        yield t
    finally:
        t.close()


def test_fifty_threads_claiming_one_operation_through_one_twin_acquire_once(
    twin: SyncRedisLedger,
) -> None:
    # one twin shared by 50 plain threads: its pool hands each its own connection
    start = threading.Barrier(50)

    def claim(n: int) -> Any:
        start.wait()
        return twin.claim(KEY, "fp", f"w{n}", 60.0)

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(claim, range(50)))
    winners = [o for o in outcomes if isinstance(o, Acquired)]
    assert len(winners) == 1, outcomes
    assert sum(isinstance(o, InFlight) for o in outcomes) == 49
    record = twin.get(KEY)
    assert record is not None and record.token == winners[0].claim.token


def test_a_keeper_thread_extends_while_the_caller_thread_claims_and_completes(
    twin: SyncRedisLedger,
) -> None:
    held = acquired(twin.claim(KEY, "fp", "w", 2.0))
    stop = threading.Event()
    leases: list[float] = []

    def keep() -> None:
        while not stop.is_set():
            leases.append(twin.extend(held, 2.0).lease_until)

    keeper = threading.Thread(target=keep)
    keeper.start()
    try:
        for i in range(30):  # the caller's own traffic, on the same twin at the same time
            other = acquired(twin.claim(OpKey("orders", f"other-{i}"), "fp", "w", 5.0))
            assert twin.complete(other, f"r{i}").state is State.COMPLETED
    finally:
        stop.set()
        keeper.join()
    assert leases and leases == sorted(leases)  # each extend pushed the lease (Redis TIME)
    done = twin.complete(held, "receipt")
    assert (done.state, done.token, done.result) == (State.COMPLETED, held.token, "receipt")


def acquired(outcome: Any) -> Claim:
    assert isinstance(outcome, Acquired), outcome
    return outcome.claim


async def test_the_twin_reloads_scripts_after_script_flush(
    twin: SyncRedisLedger, admin: aioredis.Redis
) -> None:
    first = acquired(twin.claim(KEY, "fp", "w", 30.0))
    await admin.script_flush()
    # NOSCRIPT means the script did not run: it is loaded and the call repeated, once
    second = acquired(twin.claim(OpKey("orders", "op-2"), "fp", "w", 30.0))
    await admin.script_flush()
    done = twin.complete_many([(first, "a"), (second, "b")])
    assert [(r.state, r.attempts) for r in done if isinstance(r, Record)] == [
        (State.COMPLETED, 1),
        (State.COMPLETED, 1),
    ]


async def test_the_twin_and_the_async_ledger_see_one_store(
    ledger: RedisLedger, twin: SyncRedisLedger
) -> None:
    claim = acquired(twin.claim(KEY, "fp", "w", 30.0))
    assert isinstance(await ledger.claim(KEY, "fp", "w2", 30.0), InFlight)
    await ledger.complete(claim, "from-async")
    outcome = twin.claim(KEY, "fp", "w3", 30.0)
    assert isinstance(outcome, AlreadyDone) and outcome.record.result == "from-async"
    assert abs(twin.now() - ledger.now()) < 1.0  # both estimate the same Redis TIME


def test_the_twin_maps_an_unreachable_server_as_the_async_ledger_does() -> None:
    url = "redis://ledger:s3cr3t-pw@127.0.0.1:1/0"  # nothing listens on port 1
    twin = RedisLedger(url, prefix="never:").sync()
    assert "s3cr3t-pw" not in repr(twin) and "***" in repr(twin)
    claim = Claim(KEY, "fp", 1, "w", 0.0, 1)
    try:
        for call in (
            lambda: twin.claim(KEY, "fp", "w", 5.0),
            lambda: twin.claim_many([ClaimRequest(KEY, "fp", "w", 5.0)]),
            lambda: twin.extend(claim, 5.0),
            lambda: twin.complete(claim),
            lambda: twin.get(KEY),
        ):
            with pytest.raises(LedgerUnavailable, match="running and reachable") as raised:
                call()
            assert "s3cr3t-pw" not in str(raised.value)
            assert "ledger:***@127.0.0.1:1" in str(raised.value)
            assert isinstance(raised.value.__cause__, RedisError)
    finally:
        twin.close()


async def test_the_twin_refuses_what_the_async_ledger_refuses(
    twin: SyncRedisLedger, admin: aioredis.Redis
) -> None:
    with pytest.raises(ConfigurationError, match="lease"):
        twin.claim(KEY, "fp", "w", float("nan"))
    assert twin.get(KEY) is None  # refused before anything was sent
    claim = acquired(twin.claim(KEY, "fp", "w", 30.0))
    with pytest.raises(LeaseLost, match="stale"):
        twin.release(Claim(KEY, "fp", claim.token - 1, "w", 0.0, 1))
    with pytest.raises(LeaseLost, match="stale"):
        twin.complete(Claim(KEY, "fp", claim.token + 1, "w", 0.0, 1))
    other = OpKey("orders", "foreign")
    await admin.set(twin._codec.key_for(other), "not a hash")
    with pytest.raises(ConfigurationError, match="prefix of its own"):
        twin.claim(other, "fp", "w", 5.0)


async def test_a_twin_has_the_ledgers_connection_options_and_its_own_pool(
    redis_url: str, redis_prefix: str
) -> None:
    led = RedisLedger(redis_url, prefix=redis_prefix)
    twin = led.sync()
    try:
        mine, its = (c.connection_pool.connection_kwargs for c in (led._client, twin._client))
        for option in ("client_name", "socket_timeout", "socket_connect_timeout", "host", "db"):
            assert its[option] == mine[option], option
        assert its["retry"].get_retries() == mine["retry"].get_retries() == 3
        acquired(twin.claim(KEY, "fp", "w", 30.0))
        await led.close()  # the async ledger's pool, not the twin's
        assert twin.get(KEY) is not None
        with pytest.raises(LedgerUnavailable, match="closed"):
            led.sync()
    finally:
        twin.close()
        twin.close()
    assert "closed" in repr(twin)
    with pytest.raises(LedgerUnavailable, match="closed"):
        twin.get(KEY)


async def test_a_ledger_built_from_a_client_has_no_twin(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        with pytest.raises(CapabilityError, match="url="):
            RedisLedger(prefix="x:", client=client).sync()
    finally:
        await client.aclose()


async def test_a_twin_claim_cut_mid_call_succeeds_on_the_drivers_retry(
    redis_url: str, redis_prefix: str, admin: aioredis.Redis
) -> None:
    host, port, db = _endpoint(redis_url)
    name = f"rs-test-{uuid.uuid4().hex[:8]}"
    async with Proxy(host, port) as proxy:
        led = RedisLedger(proxy.url(db, client_name=name), prefix=redis_prefix)
        twin = led.sync()
        try:
            # the proxy runs on this loop: the twin's blocking calls run in a thread
            assert await asyncio.to_thread(twin.get, KEY) is None  # connected and named
            proxy.mode = "hold"
            call = asyncio.create_task(asyncio.to_thread(twin.claim, KEY, "fp", "w1", 30.0))
            await asyncio.wait_for(proxy.held.wait(), 10)
            proxy.mode = "pass"
            assert await kill_named(admin, name) >= 1
            outcome = await asyncio.wait_for(call, 10)
            assert isinstance(outcome, Acquired) and outcome.claim.attempt == 1
            # a reply lost after the script ran: the retry answers with the claim's own lease,
            # conservatively, never a second acquisition
            proxy.mode = "drop_reply"
            other = OpKey("orders", "op-2")
            again = await asyncio.wait_for(asyncio.to_thread(twin.claim, other, "fp", "w1", 30), 10)
            assert proxy.dropped.is_set()
            assert isinstance(again, InFlight) and again.record.owner == "w1"
        finally:
            twin.close()
            await led.close()


async def test_the_packing_caches_stay_bounded_and_right(ledger: RedisLedger) -> None:
    many = [ClaimRequest(OpKey(f"s{i}", "op"), "fp", "w", 30.0) for i in range(_PACKED_MAX + 5)]
    assert all(isinstance(o, Acquired) for o in await ledger.claim_many(many))
    assert len(ledger._codec._scopes) == _PACKED_MAX + 5  # one batch fills it ...
    claim = await acquire(ledger, KEY, 30.0)
    assert len(ledger._codec._scopes) == 1  # ... the next call starts it afresh
    assert (await must_get(ledger, KEY)).token == claim.token
    assert isinstance(await ledger.claim(OpKey("s7", "op"), "fp", "w", 30.0), InFlight)


# ---------------------------------------------------------------------- the ledger's clock


class _SkewedTime:
    """A worker whose wall clock is 1000 s ahead of the Redis server's."""

    @staticmethod
    def time() -> float:
        return time.time() + 1000.0


async def test_leases_and_now_follow_redis_time_not_the_workers_clock(
    ledger: RedisLedger, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import replaysafe.stores.redis.base as module

    monkeypatch.setattr(module, "time", _SkewedTime)
    claim = await acquire(ledger, KEY, 30.0)
    sec, usec = await admin.time()
    server_now = sec + usec / 1e6
    # the lease is Redis TIME + 30 s, whatever the worker's clock says
    assert server_now < claim.lease_until <= server_now + 30.0
    # now() is the server's clock estimated through the skewed local one: close to Redis TIME
    assert abs(ledger.now() - server_now) < 100.0  # a 1000 s skew would show; RTT would not
    assert isinstance(await ledger.claim(KEY, claim.fingerprint, "w2", 30.0), InFlight)


# ---------------------------------------------------------------------- the real runtime


class RealClock(SystemClock):
    """The system clock, with the harness's ``advance`` as a no-op: real time moves by itself."""

    def advance(self, seconds: float) -> None:
        pass


async def test_crash_after_effect_with_a_keyed_effect_applies_each_operation_once(
    redis_url: str, redis_prefix: str
) -> None:
    led = RedisLedger(redis_url, prefix=redis_prefix)
    h = Harness(ledger=led, clock=RealClock())  # real time: leases are judged by Redis
    crash_on = {"charge:order-2", "charge:order-5"}
    running: set[str] = set()
    overlaps: list[str] = []
    runs: Counter[str] = Counter()

    async def charge(ctx: Context) -> str:
        # the ledger, not the downstream's key, must keep two runs of one operation apart
        if ctx.operation_id in running:
            overlaps.append(ctx.operation_id)
        running.add(ctx.operation_id)
        runs[ctx.operation_id] += 1
        try:
            await asyncio.sleep(0.05)  # long enough for the duplicate copy to arrive meanwhile
            return await h.probe.apply(
                ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key
            )
        finally:
            running.discard(ctx.operation_id)

    h.app.handler(
        "orders",
        guarantee=Guarantee.EFFECTIVELY_ONCE,
        effect=Effect.keyed("payments"),
        lease=1.0,
        retry=RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.2),
    )(charge)
    fired: set[str] = set()

    def once(ctx: Any) -> bool:
        op = ctx.get("operation_id")
        if op in crash_on and op not in fired:
            fired.add(op)
            return True
        return False

    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once)
    orders = [f"order-{i}" for i in range(10)]
    envelopes = [Envelope.of(f"charge:{o}", {"order": o, "amount": 100}) for o in orders]
    await h.publish(*envelopes, *envelopes)  # every operation arrives twice (a producer retry)
    try:
        h.start(workers=2)
        deadline = time.monotonic() + 60  # real time, bounded; leases are 1 s
        while h.depth() > 0:
            assert time.monotonic() < deadline, f"not drained: depth {h.depth()}"
            await asyncio.sleep(0.05)
    finally:
        await h.stop()
    try:
        records = [await led.get(OpKey("charge", f"charge:{o}")) for o in orders]
    finally:
        await led.close()
    assert h.failpoints.fired[fp.AFTER_EFFECT_BEFORE_LEDGER] == 2
    assert h.crashes >= 1  # both may land in one worker before it dies
    # exactly one effect per operation: the re-runs carried the same key and were answered by it
    assert h.probe.per_subject() == {o: 1 for o in orders}
    assert h.probe.replays_answered >= 2
    # the second copies were answered by the ledger (in flight or done), never run alongside
    assert overlaps == []
    assert h.total(observe.DUPLICATE_HITS) >= len(orders)
    assert all(r is not None and r.state is State.COMPLETED for r in records), records
    by_op = {r.key.operation_id: r for r in records if r is not None}
    for op, n in runs.items():
        assert n <= by_op[op].attempts, (op, n)  # every run had a claim of its own
    for op in crash_on:
        assert by_op[op].attempts >= 2  # the crashed attempt was counted before the effect


# ---------------------------------------------------------------------- quarantine admin


def _q(op: str, reason: QuarantineReason = QuarantineReason.MAX_ATTEMPTS) -> QuarantineRequest:
    return QuarantineRequest("orders", reason, operation_id=op, fingerprint="fp", message=b"{}")


async def test_purge_quarantine_keeps_every_index_consistent_across_chunks(
    ledger: RedisLedger,
    admin: aioredis.Redis,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # several scripts per purge
    monkeypatch.setattr("replaysafe.stores.redis.quarantine.PURGE_CHUNK", 2)
    bad, poison = QuarantineReason.MALFORMED_PAYLOAD, QuarantineReason.MAX_ATTEMPTS
    entries = [await ledger.quarantine(_q(f"op-{i}", [bad, poison][i % 2])) for i in range(9)]
    qidx, qbad, qpoison = (redis_prefix + s for s in ("qidx", f"qidx:{bad}", f"qidx:{poison}"))
    # by the overall index: the per-reason indexes lose the purged entries too
    assert await ledger.purge_quarantine(limit=5) == 5
    gone = {e.id.encode() for e in entries[:5]}
    left = {e.id.encode() for e in entries[5:]}
    assert set(await admin.zrange(qidx, 0, -1)) == left
    assert set(await admin.zrange(qbad, 0, -1)) | set(await admin.zrange(qpoison, 0, -1)) == left
    assert not any([await admin.exists(redis_prefix + "q:" + i.decode()) for i in gone])
    # by a reason's index: the overall index loses them too
    assert await ledger.purge_quarantine(reason=bad) == 2  # op-6, op-8
    assert await admin.zcard(qbad) == 0
    assert set(await admin.zrange(qidx, 0, -1)) == set(await admin.zrange(qpoison, 0, -1))
    # by ids over several chunks, oldest first whatever order they are named in
    ids = [e.id for e in entries]
    assert await ledger.purge_quarantine(ids[::-1], limit=1) == 1
    assert [e.id for e in await ledger.quarantined()] == [entries[7].id]
    assert await ledger.purge_quarantine(ids + ids) == 1  # repeated ids count once
    assert await admin.zcard(qidx) == 0 and await admin.zcard(qpoison) == 0
    assert [k for k in await keys_under(admin, redis_prefix) if b":q:" in k] == []


async def test_purge_quarantine_drops_an_index_member_whose_entry_was_deleted_by_hand(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    lost, kept = await ledger.quarantine(_q("lost")), await ledger.quarantine(_q("kept"))
    await admin.delete(redis_prefix + "q:" + lost.id)
    assert [e.id for e in await ledger.quarantined()] == [kept.id]
    assert await ledger.purge_quarantine() == 1  # only the real entry counts
    assert await admin.zcard(redis_prefix + "qidx") == 0


async def test_redrive_of_an_entry_purged_meanwhile_is_unknown(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim = await acquire(ledger, KEY, 5.0)
    entry = await ledger.quarantine(_q(KEY.operation_id), claim)
    real = ledger._eval

    async def purged_first(*args: Any, **kwargs: Any) -> list[Any]:
        await admin.delete(redis_prefix + "q:" + entry.id)  # between the read and the script
        return await real(*args, **kwargs)

    monkeypatch.setattr(ledger, "_eval", purged_first)
    with pytest.raises(LedgerError, match=entry.id):
        await ledger.redrive(entry.id)
    assert (await must_get(ledger, KEY)).state is State.QUARANTINED  # the script changed nothing


async def test_an_entry_written_before_message_size_was_kept_reads_its_copy_size(
    ledger: RedisLedger, admin: aioredis.Redis, redis_prefix: str
) -> None:
    entry = await ledger.quarantine(_q("old"))
    await admin.hdel(redis_prefix + "q:" + entry.id, "message_size")
    old = await ledger.quarantine_entry(entry.id)
    assert old is not None and (old.message_size, old.truncated, old.redrives) == (2, False, 0)


# ---------------------------------------------------------------------- summary


async def test_summary_scans_every_chunk_once_and_only_its_own_prefix(
    redis_url: str, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("replaysafe.stores.redis.admin.SUMMARY_CHUNK", 7)  # many SCAN round trips
    base = f"rs-test:{uuid.uuid4().hex[:10]}"
    # glob characters in the prefix are literal: "a*" must not match the "ab" ledger's keys
    mine, other = (
        RedisLedger(redis_url, prefix=base + "[a*]:"),
        RedisLedger(redis_url, prefix=base + "ab:"),
    )
    try:
        n = 60
        outcomes = await mine.claim_many(
            [ClaimRequest(OpKey("s", f"op-{i}"), "fp", "w", 60.0) for i in range(n)]
        )
        claims = [o.claim for o in outcomes if isinstance(o, Acquired)]
        await mine.complete_many([(c, None) for c in claims[:20]])
        await other.claim_many(
            [ClaimRequest(OpKey("s", f"x-{i}"), "fp", "w", 60.0) for i in range(5)]
        )
        summary = await mine.summary()
        assert summary.by_state == {"completed": 20, "in_flight": 40}
        assert (summary.expired_leases, summary.completed_last_hour) == (0, 20)
        assert summary.hot_operations == []
        assert summary.approx_bytes is not None and summary.approx_bytes > 0
    finally:
        for led in (mine, other):
            keys = [k async for k in admin.scan_iter(match=base + "*", count=1000)]
            if keys:
                await admin.delete(*keys)
            await led.close()


async def test_summary_without_memory_usage_permission_says_unknown_bytes(
    ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    await acquire(ledger, KEY, 5.0)

    async def refused() -> list[Any]:
        raise NoPermissionError("this user has no permissions to run the 'memory|usage' command")

    real = ledger._client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        original = pipe.memory_usage

        def memory_usage(*a: Any, **k: Any) -> Any:
            pipe.execute = refused  # type: ignore[method-assign]
            return original(*a, **k)

        pipe.memory_usage = memory_usage  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(ledger._client, "pipeline", pipeline)
    summary = await ledger.summary()
    assert summary.by_state == {"in_flight": 1}
    assert summary.approx_bytes is None


async def test_purge_by_ids_checks_the_cutoff_again_inside_the_script(
    ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = await ledger.quarantine(_q("again"))
    await asyncio.sleep(0.05)
    cutoff = ledger.now()
    await asyncio.sleep(0.05)
    real = ledger._eval

    async def requarantined_first(*args: Any, **kwargs: Any) -> list[Any]:
        # purged and quarantined again between the read of its age and the script: now too new
        monkeypatch.setattr(ledger, "_eval", real)
        assert await ledger.purge_quarantine([entry.id]) == 1
        assert (await ledger.quarantine(_q("again"))).created_at > cutoff
        return await real(*args, **kwargs)

    monkeypatch.setattr(ledger, "_eval", requarantined_first)
    assert await ledger.purge_quarantine([entry.id], older_than=cutoff) == 0
    assert [e.id for e in await ledger.quarantined()] == [entry.id]
