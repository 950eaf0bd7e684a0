"""The prototype sync SQLite ledger keeps the async ledger's state machine and fencing, shares
its file (tokens and records) with an async ``SQLiteLedger``, and is safe from many threads."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from replaysafe.errors import LeaseLost, LedgerUnavailable
from replaysafe.ledger._sync_sqlite import SyncSQLiteLedger
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    ClaimRequest,
    Conflict,
    InFlight,
    OpKey,
    Record,
    State,
)
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.testing import FakeClock

KEY = OpKey("orders", "op-1")


def test_claim_complete_then_duplicate_and_conflict(tmp_path: Path) -> None:
    with SyncSQLiteLedger(tmp_path / "l.db", clock=FakeClock()) as ledger:
        got = ledger.claim(KEY, "fp", "a", 10.0)
        assert isinstance(got, Acquired) and got.claim.attempt == 1
        assert isinstance(ledger.claim(KEY, "fp", "b", 10.0), InFlight)
        done = ledger.complete(got.claim, "r")
        assert done.state is State.COMPLETED and done.result == "r"
        again = ledger.claim(KEY, "fp", "b", 10.0)
        assert isinstance(again, AlreadyDone) and again.record.result == "r"
        assert isinstance(ledger.claim(KEY, "other-fp", "b", 10.0), Conflict)
        with pytest.raises(LeaseLost):
            ledger.complete(got.claim, "r")


def test_extend_release_takeover_and_fencing(tmp_path: Path) -> None:
    clock = FakeClock()
    with SyncSQLiteLedger(tmp_path / "l.db", clock=clock) as ledger:
        first = ledger.claim(KEY, "fp", "a", 10.0)
        assert isinstance(first, Acquired)
        extended = ledger.extend(first.claim, 30.0)
        assert extended.lease_until == clock.now() + 30.0
        clock.advance(20.0)  # past the first lease, inside the extended one
        assert isinstance(ledger.claim(KEY, "fp", "b", 10.0), InFlight)
        clock.advance(11.0)
        second = ledger.claim(KEY, "fp", "b", 10.0)
        assert isinstance(second, Acquired)
        assert second.claim.recovered and second.claim.token > first.claim.token
        for stale in (
            lambda: ledger.extend(first.claim, 5.0),
            lambda: ledger.complete(first.claim),
            lambda: ledger.release(first.claim),
        ):
            with pytest.raises(LeaseLost):
                stale()
        ledger.release(second.claim, "boom")
        third = ledger.claim(KEY, "fp", "c", 10.0)
        assert isinstance(third, Acquired) and third.claim.attempt == 3
        assert not third.claim.recovered


def test_batches_have_the_per_item_semantics(tmp_path: Path) -> None:
    with SyncSQLiteLedger(tmp_path / "l.db", clock=FakeClock()) as ledger:
        reqs = [ClaimRequest(OpKey("s", f"op-{i}"), "fp", "a", 10.0) for i in range(5)]
        outs = ledger.claim_many([*reqs, reqs[0]])  # a repeated key sees its earlier copy
        assert all(isinstance(o, Acquired) for o in outs[:5])
        assert isinstance(outs[5], InFlight)
        claims = [o.claim for o in outs[:5] if isinstance(o, Acquired)]
        done = ledger.complete_many([(c, None) for c in [*claims, claims[0]]])
        assert all(isinstance(d, Record) for d in done[:5])
        assert isinstance(done[5], LeaseLost)  # the same claim twice completes once
        assert ledger.claim_many([]) == [] and ledger.complete_many([]) == []


async def test_shares_the_file_with_the_async_ledger(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "shared.db"
    sync = SyncSQLiteLedger(path, clock=clock)
    async with SQLiteLedger(path, clock=clock) as async_ledger:
        first = sync.claim(KEY, "fp", "sync", 1.0)
        assert isinstance(first, Acquired)
        assert isinstance(await async_ledger.claim(KEY, "fp", "async", 1.0), InFlight)
        clock.advance(1.5)
        second = await async_ledger.claim(KEY, "fp", "async", 1.0)
        assert isinstance(second, Acquired) and second.claim.token > first.claim.token
        with pytest.raises(LeaseLost):  # taken over through the other ledger
            sync.complete(first.claim)
        assert sync.complete(second.claim).state is State.COMPLETED
        final = sync.claim(KEY, "fp", "x", 1.0)
        assert isinstance(final, AlreadyDone) and await async_ledger.get(KEY) == final.record
    sync.close()


@pytest.fixture
def fast_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond, so that threads sharing a connection without the
    ledger's lock would interleave statements inside one transaction (at the default 5 ms they
    rarely do)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_thread_switches")
def test_many_threads_acquire_each_operation_once(tmp_path: Path) -> None:
    keys = [OpKey("s", f"op-{i}") for i in range(1000)]
    acquired: list[tuple[OpKey, int]] = []
    guard = threading.Lock()
    with SyncSQLiteLedger(tmp_path / "l.db", synchronous="OFF") as ledger:

        def worker(owner: str) -> None:
            for key in keys:
                reqs = [ClaimRequest(key, "fp", owner, 60.0), ClaimRequest(key, "fp", owner, 60.0)]
                out = ledger.claim_many(reqs)[0]
                if isinstance(out, Acquired):
                    with guard:
                        acquired.append((key, out.claim.token))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(worker, ["a", "b", "c", "d"]))
    assert sorted(k for k, _ in acquired) == sorted(keys)
    assert len({t for _, t in acquired}) == len(keys)  # one token per claim, never reused


def test_close_is_idempotent_and_later_calls_fail_clearly(tmp_path: Path) -> None:
    ledger = SyncSQLiteLedger(tmp_path / "l.db")
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerUnavailable, match="closed"):
        ledger.claim(KEY, "fp", "a", 10.0)
