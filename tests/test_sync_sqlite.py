"""The sync SQLite ledger (``SQLiteLedger.sync()``) keeps the async ledger's state machine and
fencing, shares its file (tokens and records) with an async ``SQLiteLedger``, takes that ledger's
options, maps errors as it does, and is safe from many threads. The whole ledger contract through
the twin is ``TestSQLiteSyncTwin`` in test_ledger_sqlite.py."""

from __future__ import annotations

import sqlite3
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from replaysafe.errors import (
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
    Conflict,
    InFlight,
    OpKey,
    Quarantined,
    QuarantineRequest,
    Record,
    State,
)
from replaysafe.ledger.sqlite import SQLiteLedger, SyncSQLiteLedger
from replaysafe.quarantine import QuarantineReason
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


async def test_sync_is_a_twin_with_the_ledgers_options(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "l.db"
    async with SQLiteLedger(path, clock=clock, synchronous="normal", busy_timeout=0.05) as led:
        twin = led.sync()
        assert isinstance(twin, SyncSQLiteLedger) and twin is not led.sync()
        assert twin.path == str(path) and twin.now() == clock.now()
        assert repr(twin) == f"SyncSQLiteLedger({str(path)!r}, synchronous='NORMAL')"
        got = twin.claim(KEY, "fp", "a", 10.0)
        assert isinstance(got, Acquired) and got.claim.lease_until == clock.now() + 10.0
        before = await led.get(KEY)  # (opens the ledger's connection: schema check, a write)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            # the ledger's busy_timeout, not the default 30 s, and mapped as the ledger maps it
            with pytest.raises(LedgerUnavailable, match=r"busy_timeout=0\.05s") as raised:
                twin.complete(got.claim)
            assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
            assert twin.get(KEY) == before  # reads go on beside a waiting writer
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        twin.close()
        assert await led.get(KEY) == before  # closing the twin leaves the ledger open
    assert repr(twin).endswith(", closed)")


def test_options_are_validated_as_the_ledger_validates_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="synchronous"):
        SyncSQLiteLedger(tmp_path / "l.db", synchronous="SOMETIMES")
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SyncSQLiteLedger(tmp_path / "l.db", busy_timeout=-1)


def test_mark_started_quarantine_and_get(tmp_path: Path) -> None:
    clock = FakeClock()
    with SyncSQLiteLedger(tmp_path / "l.db", clock=clock) as ledger:
        assert ledger.get(KEY) is None and ledger.mark_started([]) == []
        first = ledger.claim_many([ClaimRequest(KEY, "fp", "a", 1.0, marks_start=True)])[0]
        assert isinstance(first, Acquired)
        record = ledger.get(KEY)
        assert record is not None and record.unstarted_attempt == 1
        assert ledger.mark_started([first.claim]) == [first.claim]
        record = ledger.get(KEY)
        assert record is not None and record.unstarted_attempt is None
        clock.advance(2.0)
        second = ledger.claim(KEY, "fp", "b", 10.0)
        assert isinstance(second, Acquired) and second.claim.recovered
        assert second.claim.previous_started  # marked started: the takeover must assume so
        (stale,) = ledger.mark_started([first.claim])
        assert isinstance(stale, LeaseLost)
        request = QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, "op-1", "fp")
        with pytest.raises(LeaseLost):  # fenced first: nothing written
            ledger.quarantine(request, first.claim)
        entry = ledger.quarantine(request, second.claim)
        assert entry.id == request.entry_id() and entry.seen == 1
        assert ledger.quarantine(request).seen == 2  # the same entry, seen again
        assert isinstance(ledger.claim(KEY, "fp", "c", 10.0), Quarantined)
        record = ledger.get(KEY)
        assert record is not None and record.state is State.QUARANTINED


def test_refused_data_is_ledger_data_error(tmp_path: Path) -> None:
    with SyncSQLiteLedger(tmp_path / "l.db") as ledger:
        with pytest.raises(LedgerDataError, match="refused this call's data"):
            ledger.claim(OpKey("orders", "op-\udcff"), "fp", "w", 5.0)
        with pytest.raises(LedgerDataError):
            ledger.quarantine(
                QuarantineRequest("orders", QuarantineReason.MAX_ATTEMPTS, "op-1", attempts=2**64)
            )
        assert isinstance(ledger.claim(KEY, "fp", "w", 5.0), Acquired)  # nothing stuck open


def test_an_unopenable_path_is_ledger_unavailable(tmp_path: Path) -> None:
    ledger = SyncSQLiteLedger(tmp_path / "missing-dir" / "l.db")
    with ledger, pytest.raises(LedgerUnavailable, match="writable"):
        ledger.claim(KEY, "fp", "w", 5.0)


# ---------------------------------------------------------------- transactions (complete_in)
# The sync mirror of TransactionalLedgerContract (testing/contracts/ledger.py), plus the lock.

_EFFECTS = "CREATE TABLE IF NOT EXISTS effects (op TEXT NOT NULL, note TEXT NOT NULL)"
_INSERT = "INSERT INTO effects (op, note) VALUES (?, ?)"


class HandlerFailed(Exception):
    pass


@pytest.fixture
def tx_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tled(tmp_path: Path, tx_clock: FakeClock) -> Iterator[SyncSQLiteLedger]:
    with SyncSQLiteLedger(tmp_path / "l.db", clock=tx_clock) as ledger:
        with ledger.transaction() as tx:
            tx.execute(_EFFECTS)
        yield ledger


def _effects(ledger: SyncSQLiteLedger) -> list[tuple[str, str]]:
    with ledger.transaction() as tx:
        return sorted(tx.fetchall("SELECT op, note FROM effects"))


def _acquire(ledger: SyncSQLiteLedger, owner: str = "w1") -> Claim:
    got = ledger.claim(KEY, "fp", owner, 10.0)
    assert isinstance(got, Acquired), got
    return got.claim


def test_tx_business_row_and_completion_commit_together(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "l.db"
    with SyncSQLiteLedger(path, clock=clock) as ledger:
        assert ledger.transactional is True and SyncSQLiteLedger.transactional is True
        with ledger.transaction() as tx:
            tx.execute(_EFFECTS)
        claim = _acquire(ledger)
        with ledger.transaction() as tx:
            inserted = tx.execute(_INSERT, (KEY.operation_id, "charged"))
            assert (inserted.rowcount, inserted.lastrowid, inserted.rows) == (1, 1, [])
            assert ledger.complete_in(tx, claim, "receipt-1") is None
        assert _effects(ledger) == [(KEY.operation_id, "charged")]
        record = ledger.get(KEY)
        assert record is not None and (record.state, record.result) == (
            State.COMPLETED,
            "receipt-1",
        )
        assert isinstance(ledger.claim(KEY, "fp", "w2", 10.0), AlreadyDone)
    # committed to the file, for any other connection (here: a fresh one)
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT op, note FROM effects").fetchall() == [
            (KEY.operation_id, "charged")
        ]
    finally:
        other.close()


def test_tx_fetchall_sees_the_transactions_own_writes(tled: SyncSQLiteLedger) -> None:
    with tled.transaction() as tx:
        tx.execute(_INSERT, ("op-1", "n1"))
        tx.execute(
            "INSERT INTO effects (op, note) VALUES (:op, :note)", {"op": "op-2", "note": "n2"}
        )
        rows = tx.fetchall("SELECT op, note FROM effects ORDER BY op")
    assert rows == [("op-1", "n1"), ("op-2", "n2")]


def test_tx_exception_rolls_back_business_row_and_completion(tled: SyncSQLiteLedger) -> None:
    claim = _acquire(tled)
    before = tled.get(KEY)
    with pytest.raises(HandlerFailed), tled.transaction() as tx:
        tx.execute(_INSERT, (KEY.operation_id, "charged"))
        tled.complete_in(tx, claim, "receipt-1")
        raise HandlerFailed
    assert _effects(tled) == []
    assert tled.get(KEY) == before
    # nothing happened, so the same claim can still finish the job
    with tled.transaction() as tx:
        tx.execute(_INSERT, (KEY.operation_id, "charged"))
        tled.complete_in(tx, claim, "receipt-2")
    assert _effects(tled) == [(KEY.operation_id, "charged")]
    record = tled.get(KEY)
    assert record is not None and record.result == "receipt-2"


def test_tx_rolled_back_operation_can_be_released_and_claimed_again(
    tled: SyncSQLiteLedger,
) -> None:
    claim = _acquire(tled)
    with pytest.raises(ZeroDivisionError), tled.transaction() as tx:
        tx.execute(_INSERT, (KEY.operation_id, "charged"))
        tled.complete_in(tx, claim)
        _ = 1 / 0
    tled.release(claim, "ZeroDivisionError")
    again = _acquire(tled, owner="w2")
    assert (again.attempt, again.recovered) == (2, False)
    assert _effects(tled) == []


def test_tx_interrupt_rolls_back(tled: SyncSQLiteLedger) -> None:
    """A BaseException (what a sync caller gets instead of a cancellation) rolls back too."""
    claim = _acquire(tled)
    with pytest.raises(KeyboardInterrupt), tled.transaction() as tx:
        tx.execute(_INSERT, (KEY.operation_id, "charged"))
        tled.complete_in(tx, claim)
        raise KeyboardInterrupt
    assert _effects(tled) == []
    record = tled.get(KEY)
    assert record is not None and record.state is State.IN_FLIGHT
    assert tled.complete(claim).state is State.COMPLETED  # the ledger still works


def test_tx_stale_complete_in_raises_lease_lost_and_nothing_commits(
    tled: SyncSQLiteLedger, tx_clock: FakeClock
) -> None:
    stale = _acquire(tled, owner="w1")
    tx_clock.advance(11.0)
    current = _acquire(tled, owner="w2")
    with pytest.raises(LeaseLost), tled.transaction() as tx:
        tx.execute(_INSERT, (KEY.operation_id, "charged twice?"))
        tled.complete_in(tx, stale, "nope")
    assert _effects(tled) == []
    record = tled.get(KEY)
    assert record is not None
    assert (record.state, record.token, record.owner) == (State.IN_FLIGHT, current.token, "w2")


def test_tx_callers_sql_error_propagates_unchanged_and_rolls_back(tled: SyncSQLiteLedger) -> None:
    claim = _acquire(tled)
    with (
        pytest.raises(sqlite3.OperationalError, match="no such table"),
        tled.transaction() as tx,
    ):
        tx.execute(_INSERT, (KEY.operation_id, "charged"))
        tled.complete_in(tx, claim)
        tx.execute("INSERT INTO no_such_table (x) VALUES (1)")
    assert _effects(tled) == []
    record = tled.get(KEY)
    assert record is not None and record.state is State.IN_FLIGHT


def test_tx_refused_ledger_data_is_ledger_data_error_and_rolls_back(
    tled: SyncSQLiteLedger,
) -> None:
    claim = _acquire(tled)
    with pytest.raises(LedgerDataError), tled.transaction() as tx:
        tx.execute(_INSERT, (KEY.operation_id, "charged"))
        tled.complete_in(tx, claim, "receipt-\udcff")  # no UTF-8 form: SQLite cannot bind it
    assert _effects(tled) == []
    assert tled.complete(claim, "receipt").state is State.COMPLETED


def test_tx_misuse_fails_clearly(tmp_path: Path, tled: SyncSQLiteLedger) -> None:
    claim = _acquire(tled)
    with tled.transaction() as tx:
        # a call on the twin from inside its own block would wait for itself forever
        for inside in (
            lambda: tled.get(KEY),
            lambda: tled.complete(claim),
            lambda: tled.transaction().__enter__(),
            tled.close,
        ):
            with pytest.raises(ConfigurationError, match="inside its own open transaction"):
                inside()
    with pytest.raises(LedgerError, match="finished"):
        tx.execute("SELECT 1")
    with (
        pytest.raises(ConfigurationError, match="ended the ledger's transaction"),
        tled.transaction() as ended,
    ):
        ended.execute("COMMIT")
    with pytest.raises(LedgerError, match="finished"):
        tled.complete_in(tx, claim)
    with (
        SyncSQLiteLedger(tled.path) as other,
        other.transaction() as foreign,
        pytest.raises(ConfigurationError, match="opened by this ledger"),
    ):
        tled.complete_in(foreign, claim)
    record = tled.get(KEY)  # after the block: the twin works, nothing was completed
    assert record is not None and record.state is State.IN_FLIGHT
    closed = SyncSQLiteLedger(tmp_path / "closed.db")
    closed.close()
    with pytest.raises(LedgerUnavailable, match="closed"), closed.transaction():
        pass


def test_tx_holds_the_write_lock_from_begin(tled: SyncSQLiteLedger) -> None:
    """BEGIN IMMEDIATE: other connections cannot write (nor begin a write) while the block is
    open, even before its first statement; a twin that cannot get the lock within busy_timeout
    raises LedgerUnavailable and has begun nothing."""
    other = sqlite3.connect(tled.path, timeout=0, isolation_level=None)
    try:
        with tled.transaction(), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again after the commit
        try:
            with (
                SyncSQLiteLedger(tled.path, busy_timeout=0.05) as waiting,
                pytest.raises(LedgerUnavailable, match=r"busy_timeout=0\.05s"),
                waiting.transaction(),
            ):
                pytest.fail("the block ran without the write lock")
        finally:
            other.execute("ROLLBACK")
    finally:
        other.close()
    assert _effects(tled) == []  # and the twin goes on


@pytest.mark.usefixtures("fast_thread_switches")
def test_tx_other_threads_wait_for_the_block(tled: SyncSQLiteLedger) -> None:
    """A call from another thread (a keeper extending a lease) waits for the open transaction
    and then sees only what it committed or rolled back, never its inside."""
    claim = _acquire(tled)
    seen: list[object] = []
    entered = threading.Event()

    def other() -> None:
        entered.set()
        seen.append(tled.claim(KEY, "fp", "w2", 10.0))

    worker = threading.Thread(target=other)
    with pytest.raises(HandlerFailed), tled.transaction() as tx:
        tled.complete_in(tx, claim)  # COMPLETED inside the block only
        worker.start()
        assert entered.wait(10)
        # Not synchronisation: a bounded look for a wrong outcome. Waiting on the lock, the
        # thread is still alive after any delay; without the lock it would finish at once.
        worker.join(0.2)
        assert worker.is_alive() and seen == []
        raise HandlerFailed
    worker.join(10)
    assert not worker.is_alive()
    assert len(seen) == 1 and isinstance(seen[0], InFlight)  # after the rollback: still ours
    assert tled.complete(claim).state is State.COMPLETED


async def test_tx_shares_the_file_with_the_async_ledger(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "shared.db"
    async with SQLiteLedger(path, clock=clock) as async_ledger:
        async with async_ledger.transaction() as atx:
            await atx.execute(_EFFECTS)
        with async_ledger.sync() as twin:
            claim = _acquire(twin)
            with twin.transaction() as tx:
                tx.execute(_INSERT, (KEY.operation_id, "charged"))
                twin.complete_in(tx, claim, "r")
            async with async_ledger.transaction() as atx:
                assert await atx.fetchall("SELECT op, note FROM effects") == [
                    (KEY.operation_id, "charged")
                ]
                with pytest.raises(ConfigurationError, match="opened by this ledger"):
                    twin.complete_in(atx, claim)
        assert isinstance(await async_ledger.claim(KEY, "fp", "w2", 1.0), AlreadyDone)
